"""`llamaserve serve` as a real process: keys from flag and environment, SIGTERM drains, then exit 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx

TOKENS = 40


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the server exited while loading"
        try:
            r = httpx.get(f"{url}/health", timeout=2)
            if r.status_code == 200:
                return
            assert r.status_code == 503 and r.json() == {"status": "loading"}
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"no healthy server on {url} after {timeout} s")


@contextmanager
def serve_process(tmp_path: Path, *flags: str, env: dict[str, str] | None = None,
                  ) -> Iterator[tuple[str, subprocess.Popen, IO[str]]]:
    """`llamaserve serve` on a free port with `flags`, healthy; killed on exit if it is still running."""
    port = free_port()
    log = (tmp_path / "server.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "llamaserve.cli", "serve", "--port", str(port), *flags],
                            stdout=log, stderr=subprocess.STDOUT,
                            env=os.environ | {"OMP_NUM_THREADS": "1"} | (env or {}))
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        yield url, proc, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_drains_then_exits_0(tmp_path: Path) -> None:
    flags = ("--drain-timeout", "20", "--api-key", "cli-key", "--kv-cache-memory", "0.05",
             "--max-num-seqs", "4")
    with serve_process(tmp_path, *flags, env={"LLAMASERVE_API_KEYS": "env-key"}) as (url, proc, log):
        for key in ("cli-key", "env-key"):  # both sources of keys are accepted
            r = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer other"}).status_code == 401
        auth = {"Authorization": "Bearer env-key"}

        events: list[str] = []
        first_token = threading.Event()

        def stream() -> None:
            body = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": TOKENS,
                    "temperature": 0, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=auth, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if len(events) == 2:
                            first_token.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first_token.wait(60), "the stream did not start"
        proc.send_signal(signal.SIGTERM)

        deadline = time.monotonic() + 5
        while True:  # the handler runs on the server's main thread: allow it a moment
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 1}, headers=auth)
            if r.status_code == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == "draining"
        assert httpx.get(f"{url}/health").status_code == 503

        reader.join(60)
        assert events[-1] == "[DONE]", events[-3:]
        chunks = [json.loads(e) for e in events[:-1]]
        assert all("error" not in c for c in chunks)
        assert sum(1 for c in chunks if c["choices"] and "role" not in c["choices"][0]["delta"]) == TOKENS
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"

        assert proc.wait(timeout=30) == 0
    log.seek(0)
    output = log.read()
    access = [json.loads(line.split("llamaserve.access INFO ", 1)[1]) for line in output.splitlines()
              if "llamaserve.access INFO " in line]
    assert any(a["status"] == 503 for a in access), output[-2000:]
    assert any(a["status"] == 200 and a["completion_tokens"] == TOKENS for a in access), output[-2000:]


def test_streams_cut_at_the_drain_deadline_end_in_band(tmp_path: Path) -> None:
    """A stream still running at the deadline gets an error event and [DONE]; no traceback in the log."""
    flags = ("--drain-timeout", "1", "--kv-cache-memory", "0.05", "--max-num-seqs", "2")
    with serve_process(tmp_path, *flags) as (url, proc, log):
        events: list[str] = []
        started = threading.Event()

        def stream() -> None:
            body = {"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(60), "the stream did not start"
        proc.send_signal(signal.SIGTERM)
        reader.join(30)
        assert not reader.is_alive()
        assert events[-1] == "[DONE]", events[-3:]
        error = json.loads(events[-2])["error"]
        assert "drain timeout" in error["message"] and error["type"] == "service_unavailable"
        assert proc.wait(timeout=30) == 0
    log.seek(0)
    output = log.read()
    assert "Traceback" not in output and "CancelledError" not in output, output[-3000:]
