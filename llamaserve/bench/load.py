"""Load generator: streamed requests at a fixed concurrency (closed loop) or Poisson arrivals (open loop)."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

from llamaserve.bench.prompts import BUILTIN_PROMPTS, Prompt, load_jsonl, sample_prompts


class BenchError(RuntimeError):
    """The server cannot be benchmarked (unreachable, wrong URL or key, no model): nothing was measured."""


class StreamError(ValueError):
    """The server reported an error inside the stream, or sent something that is not an OpenAI chunk."""


@dataclass(frozen=True, slots=True)
class BenchConfig:
    base_url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    model: str | None = None  # None: the first model the server lists at /v1/models
    endpoint: Literal["chat", "completions"] = "chat"
    concurrency: tuple[int, ...] = (1, 8, 16)  # closed loop, one level each
    request_rates: tuple[float, ...] = ()  # open loop, requests/s each; give this or concurrency
    num_prompts: int = 64  # requests per level
    max_tokens: int = 128
    ignore_eos: bool = False
    temperature: float = 0.0
    prompts_jsonl: str | None = None
    seed: int = 0  # prompt order and Poisson arrival times
    ttft_slo_ms: float | None = None
    tpot_slo_ms: float | None = None
    timeout: float = 600.0  # seconds per request, all of it
    label: str | None = None

    def __post_init__(self) -> None:
        url = urlsplit(self.base_url)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise ValueError(f"--base-url must look like http://HOST:PORT, got {self.base_url!r}")
        if self.endpoint not in ("chat", "completions"):
            raise ValueError(f"--endpoint must be chat or completions, got {self.endpoint!r}")
        if bool(self.concurrency) == bool(self.request_rates):
            raise ValueError("give either --concurrency levels or --request-rate values (not both)")
        if any(c < 1 for c in self.concurrency):
            raise ValueError(f"--concurrency levels must be at least 1, got {list(self.concurrency)}")
        if any(not r > 0 for r in self.request_rates):
            raise ValueError(f"--request-rate values must be above 0 (inf: all at once), got "
                             f"{list(self.request_rates)}")
        for name in ("num_prompts", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be 0 or more, got {self.temperature}")
        for name in ("timeout", "ttft_slo_ms", "tpot_slo_ms"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be above 0, got {value}")

    @property
    def api_root(self) -> str:
        """The server root: the base URL without a trailing slash or /v1."""
        return self.base_url.rstrip("/").removesuffix("/v1")

    def public_dict(self) -> dict[str, Any]:
        """The config for the JSON report, without the API key."""
        d = asdict(self)
        d["api_key"] = "<set>" if self.api_key else None
        return d


@dataclass(slots=True)
class RequestRecord:
    """One request as the client saw it. Seconds; `start` is counted from the beginning of its level."""

    index: int
    start: float
    ok: bool = False
    status: int | None = None
    error: str | None = None
    ttft: float | None = None  # send -> first content chunk
    e2e: float | None = None  # send -> end of the stream (or the failure)
    itl: list[float] = field(default_factory=list)  # gaps between consecutive content chunks
    chunks: int = 0  # content chunks
    output_tokens: int = 0  # usage.completion_tokens if the server reported it, else `chunks`
    prompt_tokens: int | None = None
    usage_reported: bool = False


@dataclass(slots=True)
class LevelRun:
    """The records of one level: a concurrency (closed loop) or a request rate (open loop)."""

    concurrency: int | None
    request_rate: float | None
    duration: float  # wall time, first send to last completion
    records: list[RequestRecord]


@dataclass(slots=True)
class BenchRun:
    config: BenchConfig
    model: str
    url: str
    started: str
    levels: list[LevelRun]


def request_body(cfg: BenchConfig, model: str, prompt: Prompt, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model, "max_tokens": max_tokens, "temperature": cfg.temperature, "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    else:
        body["prompt"] = prompt
    if cfg.ignore_eos:
        body["ignore_eos"] = True  # vLLM's and llama-server's extra field (ours too)
    return body


def chunk_text(chunk: dict[str, Any]) -> str:
    """The generated text in one streamed chunk: chat delta content (or reasoning), or completion text."""
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""  # e.g. the final usage-only chunk
    choice = choices[0]
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return choice.get("text") or ""


async def _read_stream(resp: httpx.Response, rec: RequestRecord, arrivals: list[float]) -> bool:
    """Consume the SSE stream, noting content-chunk arrival times; True if it ended with [DONE]."""
    async for line in resp.aiter_lines():
        if line.startswith("error:"):  # llama-server's SSE error event
            raise StreamError(line[6:].strip()[:200])
        if not line.startswith("data:"):
            continue  # blank separators, comments, other SSE fields
        data = line[5:].strip()
        if data == "[DONE]":
            return True
        chunk = json.loads(data)
        if not isinstance(chunk, dict):
            raise StreamError(f"stream chunk is not a JSON object: {data[:100]}")
        if "error" in chunk:
            raise StreamError(json.dumps(chunk["error"])[:200])
        if chunk_text(chunk):
            arrivals.append(time.perf_counter())
        usage = chunk.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            rec.output_tokens, rec.usage_reported = usage["completion_tokens"], True
            rec.prompt_tokens = usage.get("prompt_tokens")
    return False


async def send_request(client: httpx.AsyncClient, url: str, body: dict[str, Any], index: int, t0: float,
                       timeout: float) -> RequestRecord:
    """Send one streamed request; failures are recorded in the result, never raised."""
    rec = RequestRecord(index=index, start=time.perf_counter() - t0)
    arrivals: list[float] = []
    sent = time.perf_counter()
    done = False
    try:
        async with asyncio.timeout(timeout), client.stream("POST", url, json=body) as resp:
            rec.status = resp.status_code
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                rec.error = f"HTTP {resp.status_code}: {text.strip()[:200]}"
            else:
                done = await _read_stream(resp, rec, arrivals)
    except TimeoutError:
        rec.error = f"timed out after {timeout:g} s"
    except (httpx.HTTPError, ValueError) as e:  # ValueError: StreamError and bad JSON
        rec.error = f"{type(e).__name__}: {e}"
    rec.e2e = time.perf_counter() - sent
    rec.chunks = len(arrivals)
    if arrivals:
        rec.ttft = arrivals[0] - sent
        rec.itl = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    if not rec.usage_reported:
        rec.output_tokens = len(arrivals)
    if rec.error is None and not done:
        rec.error = "the stream ended without [DONE]"
    elif rec.error is None and not arrivals:
        rec.error = "the stream had no content"
    rec.ok = rec.error is None
    return rec


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Send times in seconds: the first at 0, then exponential gaps with mean 1/rate (all 0 for inf)."""
    rng = random.Random(seed)
    times, t = [0.0], 0.0
    for _ in range(n - 1):
        t += 0.0 if math.isinf(rate) else rng.expovariate(rate)
        times.append(t)
    return times[:n]


Send = Callable[[int, Prompt], Coroutine[Any, Any, RequestRecord]]


async def closed_loop(send: Send, prompts: list[Prompt], concurrency: int) -> list[RequestRecord]:
    """`concurrency` workers, each sending the next prompt as soon as its previous request finishes."""
    jobs = iter(enumerate(prompts))  # shared: each worker takes the next job
    records: list[RequestRecord] = []

    async def worker() -> None:
        for i, prompt in jobs:
            records.append(await send(i, prompt))

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(prompts)))))
    return records


async def open_loop(send: Send, prompts: list[Prompt], arrivals: list[float]) -> list[RequestRecord]:
    """Send prompt i at arrivals[i] seconds from now, whatever is still running."""
    t0 = time.perf_counter()
    tasks: list[asyncio.Task[RequestRecord]] = []
    for i, (prompt, at) in enumerate(zip(prompts, arrivals, strict=True)):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(i, prompt)))
    return list(await asyncio.gather(*tasks))


async def discover_model(client: httpx.AsyncClient, root: str) -> str:
    try:
        resp = await client.get(f"{root}/v1/models")
    except httpx.HTTPError as e:
        raise BenchError(f"cannot reach {root}: {type(e).__name__}: {e}") from None
    try:
        data = resp.json().get("data") if resp.status_code == 200 else None
    except (ValueError, AttributeError):
        data = None
    if not isinstance(data, list) or not data or not isinstance(data[0], dict) or "id" not in data[0]:
        raise BenchError(f"{root}/v1/models gave HTTP {resp.status_code} and no model; pass --model")
    return str(data[0]["id"])


async def run_bench(cfg: BenchConfig, log: Callable[[str], None] = lambda _: None) -> BenchRun:
    """Check the server with one request, then run every level in turn."""
    pool: list[Prompt] = load_jsonl(cfg.prompts_jsonl) if cfg.prompts_jsonl else list(BUILTIN_PROMPTS)
    if cfg.endpoint == "completions" and not all(isinstance(p, str) for p in pool):
        raise ValueError('--endpoint completions needs "prompt" strings, not "messages"')
    prompts = sample_prompts(pool, cfg.num_prompts, cfg.seed)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)  # never queue client-side
    started = datetime.now(UTC).isoformat(timespec="seconds")
    async with httpx.AsyncClient(headers=headers, timeout=cfg.timeout, limits=limits) as client:
        model = cfg.model or await discover_model(client, cfg.api_root)
        url = f"{cfg.api_root}/v1/{'chat/completions' if cfg.endpoint == 'chat' else 'completions'}"
        check = await send_request(client, url, request_body(cfg, model, prompts[0], min(cfg.max_tokens, 8)),
                                   -1, time.perf_counter(), cfg.timeout)
        if not check.ok:
            raise BenchError(f"the first request to {url} failed, nothing was measured: {check.error}")
        levels: list[LevelRun] = []
        for concurrency in cfg.concurrency:
            levels.append(await _run_level(client, url, model, cfg, prompts, concurrency, None, log))
        for rate in cfg.request_rates:
            levels.append(await _run_level(client, url, model, cfg, prompts, None, rate, log))
    return BenchRun(cfg, model, url, started, levels)


async def _run_level(client: httpx.AsyncClient, url: str, model: str, cfg: BenchConfig, prompts: list[Prompt],
                     concurrency: int | None, rate: float | None, log: Callable[[str], None]) -> LevelRun:
    t0 = time.perf_counter()

    def send(i: int, prompt: Prompt) -> Coroutine[Any, Any, RequestRecord]:
        body = request_body(cfg, model, prompt, cfg.max_tokens)
        return send_request(client, url, body, i, t0, cfg.timeout)

    name = f"concurrency {concurrency}" if concurrency is not None else f"request rate {rate:g}/s"
    log(f"{name}: sending {len(prompts)} requests")
    if concurrency is not None:
        records = await closed_loop(send, prompts, concurrency)
    elif rate is not None:
        records = await open_loop(send, prompts, poisson_arrivals(len(prompts), rate, cfg.seed))
    else:
        raise ValueError("a level needs a concurrency or a request rate")
    level = LevelRun(concurrency, rate, time.perf_counter() - t0, sorted(records, key=lambda r: r.index))
    failed = sum(not r.ok for r in records)
    log(f"{name}: {len(records) - failed} ok, {failed} failed in {level.duration:.1f} s")
    return level
