"""A client that leaves aborts its request and frees its blocks; past --max-queue requests get 429."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest

from llamaserve.engine import async_engine
from llamaserve.engine.async_engine import AsyncEngine
from llamaserve.engine.sampling_params import SamplingParams
from tests.e2e.conftest import MODEL, Live

LONG = {"messages": [{"role": "user", "content": "Count to a thousand."}], "max_tokens": 4000,
        "temperature": 0, "ignore_eos": True}


def running(client: httpx.Client) -> float:
    m = re.search(r"^llamaserve_num_requests_running (\S+)$", client.get("/metrics").text, re.M)
    assert m
    return float(m.group(1))


def wait_idle(server: Live, client: httpx.Client, timeout: float = 5.0) -> None:
    """Until nothing runs and every KV block is free again."""
    deadline = time.monotonic() + timeout
    while running(client) or server.engine.num_in_flight or server.engine.stats.blocks_in_use:
        assert time.monotonic() < deadline, (
            f"not idle after {timeout} s: {running(client)} running, {server.engine.num_in_flight} in "
            f"flight, {server.engine.stats.blocks_in_use} blocks in use")
        time.sleep(0.05)


def test_disconnect_mid_stream_aborts(server: Live) -> None:
    with server.client() as client:
        wait_idle(server, client)
        start = time.monotonic()
        with client.stream("POST", "/v1/chat/completions", json=LONG | {"stream": True}) as r:
            assert r.status_code == 200
            chunks = 0
            for line in r.iter_lines():
                chunks += line.startswith("data: ")
                if chunks == 3:  # the role chunk and two tokens
                    break
            deadline = time.monotonic() + 5
            while running(client) != 1:  # the gauge is a snapshot taken after each engine step
                assert time.monotonic() < deadline, server.engine.stats
                time.sleep(0.05)
        # leaving the block closes the connection mid-stream
        wait_idle(server, client)
        assert time.monotonic() - start < 30  # far less than 4,000 tokens take (~35 s on 2 cores)


def test_disconnect_while_waiting_for_a_full_response_aborts(server: Live) -> None:
    with server.client() as client:
        wait_idle(server, client)
        try:
            client.post("/v1/chat/completions", json=LONG, timeout=1.5)
            raise AssertionError("4,000 tokens came back within 1.5 s")
        except httpx.ReadTimeout:
            pass  # httpx closes the connection
        wait_idle(server, client)


def test_overload_gets_429_with_retry_after(queue_server: Live) -> None:
    with queue_server.client() as client:
        wait_idle(queue_server, client)
        before = client.get("/metrics").text

    async def one(c: httpx.AsyncClient, i: int) -> tuple[int, dict[str, str], str]:
        body = {"model": MODEL, "prompt": f"Story {i}: once upon a time", "max_tokens": 8, "temperature": 0,
                "ignore_eos": True, "stream": i % 2 == 1}
        r = await c.post("/v1/completions", json=body)
        return r.status_code, dict(r.headers), r.text

    async def main() -> list[tuple[int, dict[str, str], str]]:
        async with httpx.AsyncClient(base_url=queue_server.url, headers=queue_server.headers,
                                     timeout=120) as c:
            return await asyncio.gather(*(one(c, i) for i in range(10)))

    results = asyncio.run(main())
    statuses = sorted(s for s, _, _ in results)
    assert set(statuses) == {200, 429}, statuses
    for status, headers, text in results:
        if status == 429:
            assert int(headers["retry-after"]) >= 1
            assert json.loads(text)["error"]["type"] == "rate_limit_error"
        elif headers["content-type"].startswith("text/event-stream"):
            events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and all("error" not in json.loads(e) for e in events[:-1])
            assert sum(1 for e in events[:-1] if json.loads(e)["choices"]) == 8
        else:
            assert json.loads(text)["usage"]["completion_tokens"] == 8
    with queue_server.client() as client:
        after = client.get("/metrics").text
        wait_idle(queue_server, client)

    def rejected(text: str) -> float:
        m = re.search(r"^llamaserve_requests_rejected_queue_full_total (\S+)$", text, re.M)
        assert m
        return float(m.group(1))

    assert rejected(after) - rejected(before) == statuses.count(429)


def test_a_request_larger_than_the_server_is_400_not_429(queue_server: Live) -> None:
    """One sequence running plus 2 waiting is all this server holds: n=4 could never be admitted."""
    with queue_server.client() as client:
        r = client.post("/v1/completions", json={"prompt": "Hi", "n": 4, "max_tokens": 2})
        assert r.status_code == 400, r.text
        assert "4 sequences" in r.json()["error"]["message"] and "--max-queue" in r.json()["error"]["message"]
        ok = client.post("/v1/completions", json={"prompt": "Hi", "n": 3, "max_tokens": 2})
        assert ok.status_code == 200, ok.text


def test_a_reader_that_falls_too_far_behind_is_cut_off(small_engine: AsyncEngine,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine does not buffer a stalled client's output without bound: past MAX_UNREAD deltas the
    request is stopped and the reader, when it reads again, gets the error after what was buffered."""
    monkeypatch.setattr(async_engine, "MAX_UNREAD", 4)
    prompt = small_engine.tokenizer.encode("Once upon a time")

    async def run() -> tuple[int, str]:
        stream = await small_engine.generate([prompt], SamplingParams(max_tokens=40, ignore_eos=True))
        deadline = time.monotonic() + 30
        while stream.queue.qsize() <= 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # a client that reads nothing
        await asyncio.sleep(0.5)
        got = 0
        with pytest.raises(async_engine.EngineDeadError) as e:
            async for _ in stream:
                got += 1
        return got, str(e.value)

    got, message = asyncio.run(run())
    assert 1 <= got <= 6 and "read nothing of its last 4 deltas" in message
    assert small_engine.num_in_flight == 0


def test_retry_after_is_within_4x_of_the_measured_wait(queue_server: Live) -> None:
    """One sequence runs, two wait: a fourth gets 429, and Retry-After is within 4x of how long it
    really takes until the server admits it (the estimate is the sequence finishing rate)."""
    import threading

    body = {"prompt": "Once upon a time", "max_tokens": 30, "ignore_eos": True}
    with queue_server.client(timeout=120) as client:
        wait_idle(queue_server, client)
        for _ in range(3):  # the finishing rate is observed from these
            assert client.post("/v1/completions", json=body).status_code == 200
        workers = [threading.Thread(target=lambda: client.post("/v1/completions",
                                                               json=body | {"max_tokens": 50}))
                   for _ in range(3)]
        for w in workers:
            w.start()
        deadline = time.monotonic() + 10
        while queue_server.engine.num_in_flight < 3 and time.monotonic() < deadline:
            time.sleep(0.01)  # one running, two waiting: the server is full
        r = client.post("/v1/completions", json=body | {"max_tokens": 1})
        assert r.status_code == 429, r.text
        refused_at, retry_after = time.monotonic(), int(r.headers["Retry-After"])
        while client.post("/v1/completions", json=body | {"max_tokens": 1}).status_code == 429:
            time.sleep(0.05)
        waited = time.monotonic() - refused_at
        for w in workers:
            w.join(120)
    assert retry_after / 4 <= max(waited, 1.0) <= 4 * retry_after, (retry_after, waited)
