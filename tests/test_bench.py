"""`llamaserve bench` against a fake OpenAI streaming server with known timings; its pure metric functions."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from llamaserve.bench.load import (
    BenchConfig,
    LevelRun,
    RequestRecord,
    poisson_arrivals,
    request_body,
    run_bench,
)
from llamaserve.bench.prompts import BUILTIN_PROMPTS, load_jsonl, sample_prompts
from llamaserve.bench.report import format_table, percentile, summarize, tpot
from llamaserve.cli import main

FIRST_DELAY = 0.06  # the fake's time to first content chunk, seconds
GAP = 0.02  # between its content chunks
CHUNKS = 6  # content chunks per answer (fewer if max_tokens is smaller)


@dataclass
class FakeState:
    bodies: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def fake_app(state: FakeState) -> FastAPI:
    """Streams CHUNKS content chunks; prompts containing FAIL500 get a 500, STREAMERR an error mid-stream,
    NOUSAGE no usage chunk, DOUBLE a usage of two tokens per chunk."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    async def answer(body: dict[str, Any], chat: bool) -> Response:
        state.bodies.append(body)
        text = body["messages"][-1]["content"] if chat else body["prompt"]
        if "FAIL500" in text:
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        n = min(CHUNKS, body.get("max_tokens") or CHUNKS)

        def chunk(content: str | None) -> str:
            choice = {"index": 0, "delta": {"content": content}} if chat else {"index": 0, "text": content}
            return _sse({"object": "chunk", "choices": [choice]})

        async def stream() -> AsyncIterator[str]:
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
            try:
                if chat:
                    yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
                await asyncio.sleep(FIRST_DELAY)
                for i in range(n):
                    if i:
                        await asyncio.sleep(GAP)
                    yield chunk(f"tok{i} ")
                    if "STREAMERR" in text and i == 1:
                        yield _sse({"error": {"message": "engine died"}})
                        return
                if "NOUSAGE" not in text and (body.get("stream_options") or {}).get("include_usage"):
                    usage = {"prompt_tokens": 5, "completion_tokens": n * (2 if "DOUBLE" in text else 1)}
                    yield _sse({"choices": [], "usage": usage})
                yield "data: [DONE]\n\n"
            finally:
                state.in_flight -= 1

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await answer(await request.json(), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await answer(await request.json(), chat=False)

    return app


@pytest.fixture(scope="module")
def fake_server() -> Iterator[tuple[str, FakeState]]:
    state = FakeState()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(fake_app(state), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the fake server did not start"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", state
    server.should_exit = True
    thread.join(timeout=5)
    sock.close()


@pytest.fixture
def fake(fake_server: tuple[str, FakeState]) -> tuple[str, FakeState]:
    url, state = fake_server
    state.bodies.clear()
    state.max_in_flight = 0
    return url, state


def _jsonl(tmp_path: Path, prompts: list[str]) -> str:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return str(path)


# pure functions, exact numbers


def test_percentile_exact() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)
    assert percentile([4.0, 1.0, 3.0, 2.0], 0) == 1.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 100) == 4.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    xs = [random.Random(1).random() for _ in range(101)]
    for p in (1, 25, 50, 90, 99):
        assert percentile(xs, p) == pytest.approx(float(np.percentile(xs, p)))
    with pytest.raises(ValueError):
        percentile(xs, 101)


def test_tpot_exact() -> None:
    assert tpot(e2e=1.0, ttft=0.2, output_tokens=5) == pytest.approx(0.2)
    assert tpot(e2e=2.5, ttft=0.5, output_tokens=2) == pytest.approx(2.0)
    assert tpot(e2e=1.0, ttft=1.0, output_tokens=1) is None
    assert tpot(e2e=1.0, ttft=1.0, output_tokens=0) is None


def test_summarize_exact() -> None:
    records = [
        RequestRecord(0, 0.0, ok=True, ttft=0.1, e2e=0.5, itl=[0.1, 0.2, 0.1], chunks=4, output_tokens=5),
        RequestRecord(1, 0.0, ok=True, ttft=0.3, e2e=0.3, itl=[], chunks=1, output_tokens=1),
        RequestRecord(2, 0.1, ok=True, ttft=2.0, e2e=3.0, itl=[0.5], chunks=2, output_tokens=2),
        RequestRecord(3, 0.2, error="HTTP 500: boom", e2e=0.01),
        RequestRecord(4, 0.2, error="HTTP 500: boom", e2e=0.01),
    ]
    m = summarize(LevelRun(concurrency=2, request_rate=None, duration=4.0, records=records),
                  ttft_slo_ms=1000, tpot_slo_ms=150)
    assert (m.completed, m.failed, m.output_tokens) == (3, 2, 8)
    assert m.output_throughput == 2.0 and m.request_throughput == 0.75
    assert m.errors == {"HTTP 500: boom": 2}
    assert m.ttft_ms.mean == pytest.approx(800.0) and m.ttft_ms.p50 == pytest.approx(300.0)
    # TPOT: 0.4/4 = 100 ms and 1.0/1 = 1000 ms; the 1-token answer has none
    assert m.tpot_ms.mean == pytest.approx(550.0) and m.tpot_ms.p50 == pytest.approx(550.0)
    assert m.itl_ms.p50 == pytest.approx(150.0) and m.itl_ms.mean == pytest.approx(225.0)
    assert m.e2e_ms.p99 == pytest.approx(2950.0)
    # goodput: request 0 (100 ms TPOT) and request 1 (no TPOT) meet both SLOs; request 2 misses TTFT
    assert m.goodput == pytest.approx(2 / 4.0)
    assert summarize(LevelRun(1, None, 4.0, records)).goodput is None
    assert "c=2" in format_table([m])


def test_poisson_arrivals() -> None:
    times = poisson_arrivals(4000, rate=20.0, seed=3)
    assert len(times) == 4000 and times[0] == 0.0
    assert all(b >= a for a, b in zip(times, times[1:], strict=False))
    assert np.mean(np.diff(times)) == pytest.approx(1 / 20.0, rel=0.1)
    assert times == poisson_arrivals(4000, 20.0, seed=3) and times != poisson_arrivals(4000, 20.0, seed=4)
    assert poisson_arrivals(3, float("inf"), 0) == [0.0, 0.0, 0.0]


def test_prompts(tmp_path: Path) -> None:
    assert len(BUILTIN_PROMPTS) == 64 and len(set(BUILTIN_PROMPTS)) == 64
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hi"}\n\n{"messages": [{"role": "user", "content": "yo"}]}\n')
    assert load_jsonl(path) == ["hi", [{"role": "user", "content": "yo"}]]
    path.write_text('{"prompt": "hi"}\n{"text": "no"}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:2"):
        load_jsonl(path)
    picked = sample_prompts(["a", "b", "c"], 7, seed=0)
    assert len(picked) == 7 and set(picked[:3]) == {"a", "b", "c"} and picked[3:6] == picked[:3]


def test_config_and_body() -> None:
    with pytest.raises(ValueError, match="not both"):
        BenchConfig(concurrency=(1,), request_rates=(2.0,))
    with pytest.raises(ValueError, match="concurrency"):
        BenchConfig(concurrency=(0,))
    with pytest.raises(ValueError, match="base-url"):
        BenchConfig(base_url="localhost:8000")
    cfg = BenchConfig(base_url="http://h:1/v1/", ignore_eos=True, api_key="secret")
    assert cfg.api_root == "http://h:1" and "secret" not in json.dumps(cfg.public_dict())
    body = request_body(cfg, "m", "hello", 16)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["messages"] == [{"role": "user", "content": "hello"}]
    assert "ignore_eos" not in request_body(BenchConfig(endpoint="completions"), "m", "x", 4)


# against the fake server


def test_timings_match_the_fake(fake: tuple[str, FakeState], tmp_path: Path) -> None:
    url, state = fake
    cfg = BenchConfig(base_url=url, concurrency=(1,), num_prompts=3, max_tokens=32, ignore_eos=True,
                      prompts_jsonl=_jsonl(tmp_path, ["plain", "NOUSAGE", "DOUBLE"]))
    run = asyncio.run(run_bench(cfg))
    assert run.model == "fake-model" and state.bodies[-1]["ignore_eos"] is True
    records = {r.index: r for r in run.levels[0].records}
    assert all(r.ok and r.chunks == CHUNKS for r in records.values())
    sent = [b["messages"][0]["content"] for b in state.bodies[1:]]  # shuffled; at c=1 sent in index order
    by_prompt = {p: records[i] for i, p in enumerate(sent)}
    assert by_prompt["plain"].usage_reported and by_prompt["plain"].output_tokens == CHUNKS
    assert not by_prompt["NOUSAGE"].usage_reported and by_prompt["NOUSAGE"].output_tokens == CHUNKS
    assert by_prompt["DOUBLE"].output_tokens == 2 * CHUNKS
    m = summarize(run.levels[0])
    # loose bounds: two shared cores, client and server in one process
    assert m.ttft_ms.p50 is not None and FIRST_DELAY * 1000 * 0.9 <= m.ttft_ms.p50 < FIRST_DELAY * 1000 + 250
    assert m.itl_ms.mean is not None and GAP * 1000 * 0.5 <= m.itl_ms.mean < GAP * 1000 + 60
    plain = by_prompt["plain"]
    assert plain.ttft is not None and plain.e2e is not None
    assert tpot(plain.e2e, plain.ttft, plain.output_tokens) == pytest.approx(GAP, abs=0.05)
    assert len(plain.itl) == CHUNKS - 1
    assert m.output_tokens == 4 * CHUNKS and m.failed == 0


def test_closed_loop_reaches_concurrency(fake: tuple[str, FakeState]) -> None:
    url, state = fake
    run = asyncio.run(run_bench(BenchConfig(base_url=url, concurrency=(4,), num_prompts=12, max_tokens=3)))
    assert state.max_in_flight == 4
    assert len(run.levels[0].records) == 12 and all(r.ok for r in run.levels[0].records)
    assert len(state.bodies) == 1 + 12  # the check request, then the level


def test_poisson_sends_the_requested_number(fake: tuple[str, FakeState]) -> None:
    url, state = fake
    cfg = BenchConfig(base_url=url, concurrency=(), request_rates=(50.0,), num_prompts=10, max_tokens=2,
                      endpoint="completions", seed=7)
    run = asyncio.run(run_bench(cfg))
    level = run.levels[0]
    assert level.request_rate == 50.0 and level.concurrency is None
    assert len(level.records) == 10 and all(r.ok for r in level.records) and len(state.bodies) == 11
    arrivals = poisson_arrivals(10, 50.0, 7)
    assert all(r.start >= at - 0.005 for r, at in zip(level.records, arrivals, strict=True))
    assert "prompt" in state.bodies[-1]


def test_failures_are_counted(fake: tuple[str, FakeState], tmp_path: Path) -> None:
    url, _ = fake
    prompts = ["ok one", "FAIL500 a", "ok two", "STREAMERR b", "FAIL500 c", "ok three"]
    cfg = BenchConfig(base_url=url, concurrency=(2,), num_prompts=6, max_tokens=4, seed=1,
                      prompts_jsonl=_jsonl(tmp_path, prompts))
    run = asyncio.run(run_bench(cfg))
    m = summarize(run.levels[0])
    assert (m.completed, m.failed) == (3, 3)
    assert sum(n for e, n in m.errors.items() if e.startswith("HTTP 500")) == 2
    assert sum(n for e, n in m.errors.items() if "engine died" in e) == 1
    assert m.output_tokens == 3 * 4


def test_cli_json_plot_and_compare(fake: tuple[str, FakeState], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = fake
    out, png = tmp_path / "run.json", tmp_path / "run.png"
    rc = main(["bench", "--base-url", url, "--api-key", "secret", "--concurrency", "1", "3",
               "--num-prompts", "3", "--max-tokens", "3", "--ttft-slo-ms", "2000", "--label", "fake",
               "--json-out", str(out), "--plot-out", str(png)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "c=1" in table and "c=3" in table and "TTFT ms" in table
    result = json.loads(out.read_text())
    assert result["label"] == "fake" and result["config"]["api_key"] == "<set>"
    assert "secret" not in out.read_text()
    assert [lv["metrics"]["concurrency"] for lv in result["levels"]] == [1, 3]
    assert len(result["levels"][1]["requests"]) == 3 and result["levels"][0]["metrics"]["goodput"] > 0
    assert png.stat().st_size > 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    other = tmp_path / "other.json"
    other.write_text(json.dumps(result | {"label": "other"}))
    cmp = tmp_path / "cmp.png"
    assert main(["bench", "--compare", str(out), str(other), "--plot-out", str(cmp)]) == 0
    assert "other" in capsys.readouterr().out
    assert cmp.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unreachable_server_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["bench", "--base-url", f"http://127.0.0.1:{port}", "--model", "m", "--concurrency", "1",
                 "--num-prompts", "1"]) == 1
    assert "nothing was measured" in capsys.readouterr().err
