"""Connection limits uvicorn lacks: a deadline for the whole request, and a concurrency cap in our shape."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn
from fastapi import FastAPI, Request

from llamaserve.server.connections import uvicorn_config
from llamaserve.server.settings import ServerSettings


def _app(release: threading.Event) -> FastAPI:
    app = FastAPI()

    @app.get("/ok")
    def ok() -> dict:
        return {"ok": True}

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"n": len(await request.body())}

    @app.get("/hold")
    async def hold() -> dict:
        while not release.is_set():
            await asyncio.sleep(0.01)
        return {"held": True}

    return app


@contextmanager
def server(read_timeout: float = 30.0,
           limit: int | None = None) -> Iterator[tuple[str, int, threading.Event]]:
    release = threading.Event()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn_config(_app(release), read_timeout=read_timeout, limit_concurrency=limit,
                                        log_level="warning", timeout_keep_alive=30))
    t = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    while not srv.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", port, release
    finally:
        release.set()
        srv.should_exit = True
        t.join(10)
        sock.close()


def _closed_within(conn: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed `conn` (EOF), or None if it stayed open."""
    conn.settimeout(seconds)
    start = time.monotonic()
    try:
        while conn.recv(4096):
            pass
    except TimeoutError:
        return None
    return time.monotonic() - start


def test_unfinished_headers_are_closed_at_the_read_timeout() -> None:
    with server(read_timeout=0.5) as (url, port, _):
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(b"GET /ok HTTP/1.1\r\nHost: localhost\r\n")  # no blank line: headers unfinished
            took = _closed_within(conn, 5.0)
        assert took is not None and took < 2.0
        assert httpx.get(f"{url}/ok").json() == {"ok": True}  # the server itself is fine


def test_a_silent_connection_is_closed_at_the_read_timeout() -> None:
    with server(read_timeout=0.5) as (_, port, _):
        with socket.create_connection(("127.0.0.1", port)) as conn:
            assert _closed_within(conn, 5.0) is not None


def test_a_body_that_never_finishes_is_closed() -> None:
    with server(read_timeout=0.5) as (_, port, _):
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"a\":")
            assert _closed_within(conn, 5.0) is not None


def test_a_slow_but_complete_request_and_keep_alive_are_not_cut() -> None:
    with server(read_timeout=1.0) as (_, port, _):
        with socket.create_connection(("127.0.0.1", port)) as conn:
            for _ in range(2):  # two requests on one connection, each sent in pieces within the deadline
                for piece in (b"GET /ok HTTP/1.1\r\n", b"Host: localhost\r\n", b"\r\n"):
                    conn.sendall(piece)
                    time.sleep(0.2)
                conn.settimeout(5)
                reply = conn.recv(4096)
                assert reply.startswith(b"HTTP/1.1 200") and b'{"ok":true}' in reply
            time.sleep(1.5)  # idle past the read timeout: keep-alive (30 s here) governs, not the deadline
            conn.sendall(b"GET /ok HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert conn.recv(4096).startswith(b"HTTP/1.1 200")


def test_concurrency_limit_answers_503_with_retry_after_in_our_shape() -> None:
    with server(limit=2) as (url, _, release):
        with httpx.Client(base_url=url, timeout=10) as a, httpx.Client(base_url=url, timeout=10) as b:
            results: list[httpx.Response] = []
            holders = [threading.Thread(target=lambda c=c: results.append(c.get("/hold"))) for c in (a, b)]
            for h in holders:
                h.start()
            time.sleep(0.5)
            r = httpx.get(f"{url}/ok", timeout=10)
            assert r.status_code == 503
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == 503
            release.set()
            for h in holders:
                h.join(10)
            assert [x.status_code for x in results] == [200, 200]
        assert httpx.get(f"{url}/ok").status_code == 200  # below the limit again


def test_settings_validate_the_limits() -> None:
    import pytest
    with pytest.raises(ValueError, match="read_timeout"):
        ServerSettings(read_timeout=0)
    with pytest.raises(ValueError, match="limit_concurrency"):
        ServerSettings(limit_concurrency=0)
