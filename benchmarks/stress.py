"""`make stress`: the server under overload, disconnects and slow readers, on loopback only; writes
RELIABILITY.md.

    .venv/bin/python benchmarks/stress.py [--requests 10000] [--disconnects 1000] [--out RELIABILITY.md]

`llamaserve serve` in a child process on 127.0.0.1 (the embedded model; its gauges read from /metrics
and /health, its RSS from the OS), run twice: tiny limits (--max-num-seqs 4, --max-queue 8) and the
defaults. Phases, each bounded in count and time:
1. mixed load: `--requests` requests (chat, completions, /predict; streamed or not; every fourth chat
   with a json_schema) from 4x as many clients as the server holds (running + queue), counting 5xx,
   incomplete accepted requests, and 429s without Retry-After (a client waits what Retry-After says,
   capped at 2 s, before its next request, as the official SDKs do); /health probed every 50 ms from a
   process of its own (benchmarks/health_probe.py), so that the load clients' scheduling is not in its
   samples; a probe without a 200 counts, and fails the target;
2. `--disconnects` streams dropped after their first chunk: afterwards no KV block in use, the running
   and waiting gauges 0, RSS within 5 % of before;
3. slow readers (streams read one chunk a second) beside normal clients: the normal clients' TTFT p99
   against a run without the slow readers;
4. SIGTERM under load: every accepted stream ends with [DONE] (finished, or an in-band error at the
   drain deadline), requests after the signal get 503 or a refused connection, the process exits 0.
Then once: 200 GGUF mutants through the CLI under a memory limit (benchmarks/gguf_mutants.py), and
schemathesis with all checks (tests/e2e/test_schemathesis.py with 100 examples per operation).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf_mutants  # benchmarks/ is on sys.path when run as a script
import httpx
import psutil
from health_probe import HealthProbe, HealthSamples

from llamaserve.model.native import cpu_description

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


def _is_error_event(line: str) -> bool:
    """An SSE data line that is an error event, as a client reads it: a JSON object with an "error" key
    (not a line whose generated text happens to be the word: the delta "error" is `"content":"error"`)."""
    try:
        event = json.loads(line.removeprefix("data: "))
    except ValueError:
        return line != "data: [DONE]"  # anything else that is not JSON is broken
    return isinstance(event, dict) and "error" in event


async def _one(client: httpx.AsyncClient, rng: random.Random, tally: Tally) -> None:
    path, body, stream = _body(rng)
    tally.sent += 1
    try:
        if stream:
            async with client.stream("POST", path, json=body) as r:
                if r.status_code == 200:
                    lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
                    errors = any(_is_error_event(x) for x in lines)
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
        # as the official SDKs do: wait what Retry-After says (capped here at 2 s) before the next try
        await asyncio.sleep(min(2.0, float(headers.get("retry-after", 1))))
    elif status >= 500:
        tally.server_errors += 1
    else:
        tally.client_errors[status] = tally.client_errors.get(status, 0) + 1


async def _mixed(url: str, requests: int, clients: int, seed: int) -> tuple[Tally, float]:
    tally = Tally()
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
    return tally, time.perf_counter() - start


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


class ServerProcess:
    """`llamaserve serve` as a user starts it, on a free loopback port."""

    def __init__(self, flags: list[str]) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()
        command = [sys.executable, "-m", "llamaserve.cli", "serve", "--port", str(self.port),
                   "--no-access-log"]
        self.proc = subprocess.Popen(command + flags, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {self.output()[-2000:]}")
            time.sleep(0.2)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def gauges(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        values = {}
        for line in text.splitlines():
            if line.startswith("llamaserve_num_requests_"):
                name, value = line.split()
                values[name] = float(value)
        health = httpx.get(f"{self.url}/health", timeout=10).json()
        values["blocks_in_use"] = health["kv_cache"]["blocks_in_use"]
        return values

    def idle(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(self.gauges().values()):
                return True
            time.sleep(0.2)
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


async def _sigterm(server: ServerProcess, streams: int, drain: float) -> str:
    """Streams in flight, then SIGTERM: how each ended, what later requests got, how the process exited."""
    short = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 24, "stream": True}
    long = short | {"max_tokens": 1500, "ignore_eos": True}  # these run into the drain deadline
    ended = {"finished": 0, "in-band error": 0, "not ended properly": 0, "refused": 0}
    later: dict[str, int] = {}
    limits = httpx.Limits(max_connections=streams + 8)
    async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
        async def one(body: dict[str, Any]) -> None:
            try:
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        await r.aread()
                        ended["refused"] += 1
                        return
                    lines = [x async for x in r.aiter_lines() if x.startswith("data: ")]
            except httpx.TransportError:
                ended["not ended properly"] += 1
                return
            done = bool(lines) and lines[-1] == "data: [DONE]"
            error = any(_is_error_event(x) for x in lines)
            ended["not ended properly" if not done else "in-band error" if error else "finished"] += 1

        tasks = [asyncio.create_task(one(long if i % 4 == 0 else short)) for i in range(streams)]
        await asyncio.sleep(2.0)
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        for _ in range(20):  # while draining: 503, or a refused connection once it has closed
            try:
                r = await client.post("/v1/completions", json=short | {"stream": False})
                key = str(r.status_code)
            except httpx.TransportError:
                key = "connection refused"
            later[key] = later.get(key, 0) + 1
            await asyncio.sleep(0.1)
        await asyncio.gather(*tasks)
    code = await asyncio.to_thread(server.proc.wait, drain + 30)
    took = time.monotonic() - signalled
    tracebacks = server.output().count("Traceback")
    return (f"- SIGTERM with {streams} streams in flight (a quarter of them 1,500 tokens long, "
            f"--drain-timeout {drain:g}): {ended['finished']} finished, {ended['in-band error']} ended "
            f"with an in-band error and [DONE] at the deadline, **{ended['not ended properly']} not ended "
            "properly**, "
            f"{ended['refused']} refused when sent; requests after the signal: "
            f"{', '.join(f'{v} {k}' for k, v in sorted(later.items()))}; exit status {code} after "
            f"{took:.1f} s; {tracebacks} tracebacks in the log")


def run_limits(name: str, flags: list[str], max_num_seqs: int, max_queue: int,
               args: argparse.Namespace) -> list[str]:
    drain = 10.0
    server = ServerProcess(flags + ["--max-num-seqs", str(max_num_seqs), "--max-queue", str(max_queue),
                                    "--drain-timeout", str(drain)])
    try:
        clients = min(256, 4 * (max_num_seqs + max_queue))  # 4x what it holds, <= 256
        with HealthProbe(server.url) as probe:  # started before the load, stopped (or killed) after it
            tally, seconds = asyncio.run(_mixed(server.url, args.requests, clients, args.seed))
        health = probe.samples
        idle_after_load = server.idle()
        rss_before = server.rss()
        started = asyncio.run(_disconnects(server.url, args.disconnects, clients))
        idle = server.idle()
        rss_after = server.rss()
        slow = max(1, max_num_seqs // 4)  # slow readers hold a quarter of the running slots
        # As many normal clients as the slots the slow readers leave, at most 4: what is measured is what
        # the slow readers cost the others, not a queue that the normal clients alone would make (4
        # normal clients fill the tiny limits' 4 slots without any slow reader). 25 rounds each, so that
        # p99 is a quantile of 75-100 first tokens, not the largest of 20.
        normal = min(4, max_num_seqs - slow)
        base_p99 = asyncio.run(_ttft_p99(server.url, normal, 25, 0))
        slow_p99 = asyncio.run(_ttft_p99(server.url, normal, 25, slow))
        sigterm = asyncio.run(_sigterm(server, 2 * max_num_seqs + max_queue // 2, drain))
    finally:
        server.stop()
    return [
        f"### {name}: --max-num-seqs {max_num_seqs}, --max-queue {max_queue}",
        "",
        f"- mixed load: {tally.sent} requests from {clients} clients in {seconds:.0f} s: {tally.ok} "
        "complete, "
        f"**{tally.server_errors} 5xx**, {tally.incomplete} accepted but incomplete, {tally.refused_429} "
        f"429 ({tally.refused_429_without_retry_after} without Retry-After), other 4xx "
        f"{tally.client_errors or 0}, {tally.transport_errors} transport errors; idle afterwards: "
        f"{idle_after_load}",
        _health_line(health),
        f"- {args.disconnects} streams dropped after their first chunk ({started} got one): idle afterwards "
        f"(no KV block in use, running/waiting 0): {idle}; RSS {rss_before / 2**20:.0f} -> "
        f"{rss_after / 2**20:.0f} MiB ({(rss_after / rss_before - 1) * 100:+.1f} %)",
        f"- TTFT p99 of {normal} normal clients: {base_p99 * 1000:.0f} ms alone, {slow_p99 * 1000:.0f} ms "
        "beside "
        f"{slow} slow readers ({slow_p99 / base_p99:.2f}x)",
        sigterm,
        "",
    ]


def _health_line(health: HealthSamples) -> str:
    not_ok = ", ".join(f"{n} {status}" for status, n in sorted(health.not_ok.items())) or "0"
    return (f"- /health during it, probed every 50 ms from a process of its own (so that the load clients' "
            f"scheduling is not in its samples): {len(health.latencies)} samples, "
            f"p99 {health.p99_ms():.1f} ms (a probe without a 200 counts as infinitely slow), "
            f"max {health.max_ok_ms():.1f} ms; **{health.failed} without a 200** (not 200: {not_ok}; "
            f"no answer: {health.errors})"
            + ("; the probe stopped at its bound before the load ended" if health.bounded else ""))


def _schemathesis(examples: int) -> str:
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/e2e/test_schemathesis.py"], capture_output=True, text=True,
                       env=os.environ | {"LLAMASERVE_FUZZ_EXAMPLES": str(examples)})
    out = r.stdout.strip().splitlines()
    last = (out or ["no output"])[-1]
    # what failed, so that a failure found by chance can be reproduced from this file
    found = [line.strip(" |") for i, line in enumerate(out) if "- ST" in line
             or (i and "- ST" in out[i - 1]) or line.strip(" |").startswith("`{")][:12]
    return (f"- schemathesis, all checks, {examples} examples per operation "
            f"(`LLAMASERVE_FUZZ_EXAMPLES={examples} pytest tests/e2e/test_schemathesis.py`): {last} "
            f"({time.perf_counter() - start:.0f} s)" + "".join(f"\n  - {x[:300]}" for x in found))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--disconnects", type=int, default=1000)
    ap.add_argument("--mutants", type=int, default=200)
    ap.add_argument("--fuzz-examples", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="RELIABILITY.md")
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    lines = ["# Reliability", "",
             f"`.venv/bin/python benchmarks/stress.py --requests {args.requests} --disconnects "
             f"{args.disconnects} --mutants {args.mutants} --fuzz-examples {args.fuzz_examples}` (`make "
             f"stress` runs the defaults), commit {commit.strip()}, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpu_description()}, "
             f"{psutil.cpu_count()} cores, the embedded SmolLM2-135M, loopback only.", ""]
    lines += run_limits("tiny limits", ["--kv-cache-memory", "0.05"], 4, 8, args)
    lines += run_limits("default limits", ["--kv-cache-memory", "0.25"], 64, 256, args)
    lines += ["### hostile files and bodies", ""]
    outcomes = gguf_mutants.run(args.mutants, args.seed, 2.0)
    lines += gguf_mutants.summary(outcomes, 2.0)
    lines += [_schemathesis(args.fuzz_examples), ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
