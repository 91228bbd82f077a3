"""`make stress`: the server under overload, disconnects and slow readers, on loopback only; writes
RELIABILITY.md.

    .venv/bin/python benchmarks/stress.py [--requests 10000] [--disconnects 1000] [--out RELIABILITY.md]

One uvicorn server in this process on 127.0.0.1 (the embedded model), run twice: tiny limits
(--max-num-seqs 4, --max-queue 8) and the defaults. Phases, each bounded in count and time:
1. mixed load: `--requests` requests (chat, completions, /predict; streamed or not; every fourth chat
   with a json_schema) from 4x as many clients as the server holds (running + queue), counting 5xx,
   incomplete accepted requests, and 429s without Retry-After; /health sampled every 50 ms throughout;
2. `--disconnects` streams dropped after their first chunk: afterwards no KV block in use, the running
   and waiting gauges 0, RSS within 5 % of before;
3. slow readers (streams read one chunk a second) beside normal clients: the normal clients' TTFT p99
   against a run without the slow readers.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import uvicorn
from engine_throughput import cpu_name  # benchmarks/ is on sys.path when run as a script

from llamaserve.config import EngineConfig
from llamaserve.engine.async_engine import AsyncEngine
from llamaserve.engine.llm_engine import LLMEngine
from llamaserve.server.app import create_app
from llamaserve.server.settings import ServerSettings

MODEL = "smollm2-135m-instruct"
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 40}},
          "required": ["answer"], "additionalProperties": False}


@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    incomplete: int = 0  # accepted (200) but the body or stream did not finish properly
    refused_429: int = 0
    refused_429_without_retry_after: int = 0
    client_errors: dict[int, int] = field(default_factory=dict)
    server_errors: int = 0
    transport_errors: int = 0


def _body(rng: random.Random) -> tuple[str, dict[str, Any], bool]:
    kind = rng.choice(["chat", "chat", "completions", "predict"])
    stream = kind != "predict" and rng.random() < 0.5
    tokens = rng.choice([4, 8, 16])
    if kind == "chat":
        body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "Say something."}],
                                "max_tokens": tokens, "stream": stream}
        if rng.random() < 0.25:
            body |= {"response_format": {"type": "json_schema",
                                         "json_schema": {"name": "a", "schema": SCHEMA}}, "max_tokens": 32}
        return "/v1/chat/completions", body, stream
    if kind == "completions":
        return "/v1/completions", {"model": MODEL, "prompt": "Once upon a time", "max_tokens": tokens,
                                   "stream": stream}, stream
    return "/predict", {"prompt": "Say hello", "max_tokens": tokens}, False


async def _one(client: httpx.AsyncClient, rng: random.Random, tally: Tally) -> None:
    path, body, stream = _body(rng)
    tally.sent += 1
    try:
        if stream:
            async with client.stream("POST", path, json=body) as r:
                if r.status_code == 200:
                    lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
                    errors = any('"error"' in x for x in lines)
                    done = bool(lines) and lines[-1] == "data: [DONE]" and not errors
                    tally.ok += done
                    tally.incomplete += not done
                    return
                await r.aread()
                status, headers = r.status_code, r.headers
        else:
            r = await client.post(path, json=body)
            status, headers = r.status_code, r.headers
            if status == 200:
                tally.ok += 1
                return
    except httpx.TransportError:
        tally.transport_errors += 1
        return
    if status == 429:
        tally.refused_429 += 1
        tally.refused_429_without_retry_after += "retry-after" not in headers
    elif status >= 500:
        tally.server_errors += 1
    else:
        tally.client_errors[status] = tally.client_errors.get(status, 0) + 1


async def _health_sampler(url: str, stop: asyncio.Event, samples: list[float]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while not stop.is_set():
            start = time.perf_counter()
            await client.get("/health")
            samples.append(time.perf_counter() - start)
            await asyncio.sleep(0.05)


async def _mixed(url: str, requests: int, clients: int, seed: int) -> tuple[Tally, list[float], float]:
    tally, health, stop = Tally(), [], asyncio.Event()
    sampler = asyncio.create_task(_health_sampler(url, stop, health))
    queue = list(range(requests))
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def worker(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            while queue:
                queue.pop()
                await _one(client, rng, tally)
        await asyncio.gather(*(worker(i) for i in range(clients)))
    stop.set()
    await sampler
    return tally, health, time.perf_counter() - start


async def _disconnects(url: str, count: int, concurrency: int) -> int:
    """Streams dropped after their first chunk; returns how many got that far."""
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True,
            "stream": True}
    started = 0
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        async def one() -> None:
            nonlocal started
            async with sem:
                try:
                    async with client.stream("POST", "/v1/completions", json=body) as r:
                        if r.status_code == 200:
                            async for _ in r.aiter_lines():
                                started += 1
                                break
                except httpx.TransportError:
                    pass
        await asyncio.gather(*(one() for _ in range(count)))
    return started


async def _ttft_p99(url: str, clients: int, rounds: int, slow: int) -> float:
    """Normal clients' TTFT p99 (s) while `slow` streams are read one chunk a second."""
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "stream": True}
    ttfts: list[float] = []
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        async def slow_reader() -> None:
            async with client.stream("POST", "/v1/completions",
                                     json=body | {"max_tokens": 400, "ignore_eos": True}) as r:
                async for _ in r.aiter_lines():
                    if stop.is_set():
                        return
                    await asyncio.sleep(1.0)

        async def normal() -> None:
            for _ in range(rounds):
                start = time.perf_counter()
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    first = True
                    async for line in r.aiter_lines():
                        if first and line.startswith("data: ") and '"text"' in line:
                            ttfts.append(time.perf_counter() - start)
                            first = False

        slow_tasks = [asyncio.create_task(slow_reader()) for _ in range(slow)]
        await asyncio.sleep(0.5 if slow else 0)
        await asyncio.gather(*(normal() for _ in range(clients)))
        stop.set()
        for t in slow_tasks:
            t.cancel()
        await asyncio.gather(*slow_tasks, return_exceptions=True)
    return statistics.quantiles(ttfts, n=100, method="inclusive")[98]


def _serve(engine: LLMEngine, settings: ServerSettings) -> tuple[str, AsyncEngine, uvicorn.Server]:
    async_engine = AsyncEngine(engine)
    async_engine.start()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(async_engine, settings, MODEL), log_level="error"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", async_engine, server


def _idle(async_engine: AsyncEngine, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = async_engine.stats
        if not (async_engine.num_in_flight or s.blocks_in_use or s.num_running or s.num_waiting):
            return True
        time.sleep(0.1)
    return False


def run_limits(name: str, engine_config: EngineConfig, settings: ServerSettings, args: argparse.Namespace,
               base: LLMEngine) -> list[str]:
    engine = LLMEngine(base.runner.model, base.tokenizer, engine_config)
    url, async_engine, server = _serve(engine, settings)
    clients = min(256, 4 * (engine_config.max_num_seqs + settings.max_queue))  # 4x what it holds, <= 256
    tally, health, seconds = asyncio.run(_mixed(url, args.requests, clients, args.seed))
    idle_after_load = _idle(async_engine)
    rss_before = psutil.Process().memory_info().rss
    started = asyncio.run(_disconnects(url, args.disconnects, clients))
    idle = _idle(async_engine)
    rss_after = psutil.Process().memory_info().rss
    slow = max(1, engine_config.max_num_seqs // 4)  # slow readers hold a quarter of the running slots
    base_p99 = asyncio.run(_ttft_p99(url, 4, 5, 0))
    slow_p99 = asyncio.run(_ttft_p99(url, 4, 5, slow))
    server.should_exit = True
    async_engine.shutdown()
    p99 = statistics.quantiles(health, n=100, method="inclusive")[98] * 1000 if len(health) > 2 else 0.0
    return [
        f"### {name}: --max-num-seqs {engine_config.max_num_seqs}, --max-queue {settings.max_queue}",
        "",
        f"- mixed load: {tally.sent} requests from {clients} clients in {seconds:.0f} s: {tally.ok} "
        "complete, "
        f"**{tally.server_errors} 5xx**, {tally.incomplete} accepted but incomplete, {tally.refused_429} "
        f"429 ({tally.refused_429_without_retry_after} without Retry-After), other 4xx "
        f"{tally.client_errors or 0}, {tally.transport_errors} transport errors; idle afterwards: "
        f"{idle_after_load}",
        f"- /health during it: {len(health)} samples, p99 {p99:.1f} ms, max {max(health) * 1000:.1f} ms",
        f"- {args.disconnects} streams dropped after their first chunk ({started} got one): idle afterwards "
        f"(no KV block in use, running/waiting 0): {idle}; RSS {rss_before / 2**20:.0f} -> "
        f"{rss_after / 2**20:.0f} MiB ({(rss_after / rss_before - 1) * 100:+.1f} %)",
        f"- TTFT p99 of 4 normal clients: {base_p99 * 1000:.0f} ms alone, {slow_p99 * 1000:.0f} ms beside "
        f"{slow} slow readers ({slow_p99 / base_p99:.2f}x)",
        "",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--disconnects", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="RELIABILITY.md")
    args = ap.parse_args()
    base = LLMEngine.from_model(None, EngineConfig(max_num_seqs=4, kv_cache_memory=0.05))
    base.grammars.tokenizer  # noqa: B018  (as `llamaserve serve` does at start-up)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    cpu = cpu_name()
    lines = ["# Reliability", "",
             f"`.venv/bin/python benchmarks/stress.py --requests {args.requests} --disconnects "
             f"{args.disconnects}` (`make stress` runs the defaults, 10,000 and 1,000), commit "
             f"{commit.strip()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpu}, "
             f"{psutil.cpu_count()} cores, the embedded SmolLM2-135M, loopback only.", ""]
    lines += run_limits("tiny limits", EngineConfig(max_num_seqs=4, kv_cache_memory=0.05),
                        ServerSettings(max_queue=8, log_requests=False), args, base)
    lines += run_limits("default limits", EngineConfig(kv_cache_memory=0.25),
                        ServerSettings(log_requests=False), args, base)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
