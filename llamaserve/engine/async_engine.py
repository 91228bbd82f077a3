"""One engine thread stepping the LLMEngine; each HTTP request gets one asyncio queue of typed deltas."""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import queue
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llamaserve.config import ModelConfig
from llamaserve.engine.llm_engine import LLMEngine
from llamaserve.engine.outputs import RequestOutput
from llamaserve.engine.sampling_params import SamplingParams
from llamaserve.engine.structured import Grammar
from llamaserve.loader.tokenizer import Tokenizer

if TYPE_CHECKING:
    from llamaserve.loader.weights import ModelSource

log = logging.getLogger("llamaserve.engine")


class EngineDeadError(RuntimeError):
    """The engine thread failed; no request can be served until a restart."""


_Batches = dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, tuple]]]  # a step's deliveries, per loop


def _put_all(items: list[tuple[asyncio.Queue, tuple]]) -> None:
    """On the event loop: one step's deliveries, in order."""
    for q, item in items:
        q.put_nowait(item)


def _settle(future: asyncio.Future, result: object, error: BaseException | None) -> None:
    """Resolve a future from the event loop's side, unless its waiter has gone."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


# Deltas a request's queue may hold unread: a client this far behind (a slow or stalled reader) is
# cut off rather than buffered without bound.
MAX_UNREAD = 4096


class QueueFull(Exception):
    """Admission refused: more sequences already wait than the queue bound allows."""

    def __init__(self, waiting: int, max_queue: int, retry_after: int) -> None:
        super().__init__(f"the server is at capacity: {waiting} sequences are already waiting "
                         f"(--max-queue {max_queue}); retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass(slots=True)
class EngineStats:
    num_running: int  # sequences
    num_running_requests: int
    num_waiting: int  # sequences
    kv_cache_usage: float
    prefix_query_tokens: int
    prefix_hit_tokens: int
    tokens_per_second: float  # recent generation throughput, for Retry-After estimates
    num_preemptions: int = 0  # over the engine's lifetime
    blocks_in_use: int = 0


@dataclass(slots=True)
class _Add:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    grammar: Grammar | None



@dataclass(slots=True)
class _Abort:
    request_id: str


@dataclass(slots=True)
class _FailAll:
    message: str


# Tokens of embedding inputs run in one forward between generation steps: many short inputs share one,
# while a long one still runs alone, so a stream beside a batch of embeddings keeps its pace.
EMBED_BATCH_TOKENS = 256


@dataclass(slots=True)
class _Embed:
    """Embeddings of some prompts, run on the engine thread between steps, a few at a time."""

    prompts: list[list[int]]
    pooling: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    done: list[list[float]] = field(default_factory=list)


@dataclass(slots=True)
class _Target:
    """Where the engine thread delivers one engine request's outputs: (prompt index, output)."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    index: int


@dataclass(slots=True, eq=False)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass(eq=False)
class RequestStream:
    """The deltas of one HTTP request's prompts, in arrival order: `async for i, out in stream`.

    Closing it (or dropping it) aborts whatever has not finished; a failed engine raises EngineDeadError.
    """

    engine: AsyncEngine
    ids: list[str]
    queue: asyncio.Queue
    started: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    _final: dict[int, RequestOutput] = field(default_factory=dict)
    _open: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._open = set(range(len(self.ids)))
        weakref.finalize(self, self.engine._close, list(self.ids), self._open)

    @property
    def usage(self) -> Usage:
        """Token counts so far, from each prompt's latest output (they are cumulative)."""
        finals = self._final.values()
        return Usage(sum(o.prompt_tokens for o in finals), sum(o.completion_tokens for o in finals),
                     sum(o.cached_tokens for o in finals))

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.started

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if not self._open:
            raise StopAsyncIteration
        i, out = await self.queue.get()
        if isinstance(out, BaseException):
            self.close()
            raise out
        if self.first_token is None and any(c.token_ids for c in out.outputs):
            self.first_token = time.monotonic()
        self._final[i] = out
        if out.finished:
            self._open.discard(i)
            self.engine._finished(out)
        if out.error:  # the engine failed and finished every request with this message
            self.close()
            raise EngineDeadError(out.error)
        return i, out

    def close(self) -> None:
        self.engine._close(self.ids, self._open)


class AsyncEngine:
    """Thread-safe front of the engine: `generate` admits and streams a request, closing it aborts."""

    def __init__(self, engine: LLMEngine) -> None:
        self._engine = engine
        self._commands: queue.SimpleQueue[_Add | _Abort | _FailAll | _Embed] = queue.SimpleQueue()
        self._embeds: list[_Embed] = []  # engine thread only
        self._embeds_queued = 0  # prompts of embedding requests not done yet (under _lock)
        self._wake = threading.Event()
        self._targets: dict[str, _Target] = {}
        self._lock = threading.Lock()  # guards _targets and _queued
        self._queued = 0  # sequences handed to generate() that the engine thread has not added yet
        self._thread: threading.Thread | None = None
        self._stop = False
        self.error: str | None = None
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens of a step)
        self._recent_tokens = 0  # the sum of _recent's tokens
        self._done_times: list[float] = []  # when sequences finished, over the last minute
        self._stats = EngineStats(0, 0, 0, 0.0, 0, 0, 0.0)
        self._avg_completion_tokens = 128.0  # per sequence, for Retry-After estimates
        self._step_started: float | None = None  # when the running step began (None between steps)

    # -- what the server reads ------------------------------------------------------------------
    @property
    def source(self) -> ModelSource | None:
        """Where the model came from (a loader ModelSource), or None for an engine built in code."""
        return self._engine.source

    @property
    def model_config(self) -> ModelConfig:
        return self._engine.model_config

    @property
    def tokenizer(self) -> Tokenizer:
        return self._engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self._engine.max_model_len

    @property
    def kv_cache(self) -> dict[str, int | str]:
        return self._engine.kv_plan.as_dict() | {"blocks_in_use": self._stats.blocks_in_use}

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    @property
    def stats(self) -> EngineStats:
        return self._stats

    @property
    def num_in_flight(self) -> int:
        """Engine requests with a consumer (an HTTP request with several prompts counts each)."""
        with self._lock:
            return len(self._targets)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llamaserve-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- requests -------------------------------------------------------------------------------
    async def generate(self, prompts: list[list[int]], params: SamplingParams,
                       max_queue: int | None = None) -> RequestStream:
        """Validate, admit, compile the grammar (off the loop), then queue every prompt.

        Raises ValueError for a bad request, QueueFull past `max_queue` waiting sequences (None: no
        bound), EngineDeadError after an engine failure; all before anything is queued.
        """
        if self.error is not None:
            raise EngineDeadError(self.error)
        new = len(prompts) * params.n
        bound = self._engine.config.max_num_seqs + (max_queue or 0)
        if max_queue is not None and new > bound:
            raise ValueError(f"this request holds {new} sequences (prompts x n), more than the server ever "
                             f"holds at once ({bound}: --max-num-seqs plus --max-queue)")
        for prompt in prompts:  # reads only the engine's fixed configuration: safe off its thread
            self._engine.check_request(prompt, params)
        grammar = None
        if params.structured is not None:
            grammar = await asyncio.to_thread(self._engine.grammars.compile, params.structured)
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        rid = uuid.uuid4().hex[:16]
        ids = [f"{rid}-{i}" for i in range(len(prompts))]
        with self._lock:
            self._admit(new, max_queue)
            self._queued += new
            for i, request_id in enumerate(ids):
                self._targets[request_id] = _Target(loop, out, i)
        for request_id, prompt in zip(ids, prompts, strict=True):
            self._commands.put(_Add(request_id, prompt, params, grammar))
        self._wake.set()
        return RequestStream(self, ids, out)

    async def embed(self, prompts: list[list[int]], pooling: str = "mean",
                    max_queue: int | None = None) -> list[list[float]]:
        """L2-normalised embeddings ("mean" or "last" pooling) of token-id prompts, computed on the engine
        thread between generation steps (a step's worth of tokens at a time, no KV cache), so generation
        keeps going.
        ValueError for a bad prompt, QueueFull past `max_queue` prompts waiting for embeddings."""
        if self.error is not None:
            raise EngineDeadError(self.error)
        if pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
        vocab = self._engine.model_config.vocab_size
        for prompt in prompts:
            if not prompt:
                raise ValueError("an input to embed is empty")
            if len(prompt) > self.max_model_len:
                raise ValueError(f"an input has {len(prompt)} tokens, more than the context length "
                                 f"({self.max_model_len}); it is not truncated")
            if any(not 0 <= t < vocab for t in prompt):
                raise ValueError(f"token ids must be in 0..{vocab - 1}")
        loop = asyncio.get_running_loop()
        job = _Embed(prompts, pooling, loop, loop.create_future())
        with self._lock:
            if max_queue is not None and self._embeds_queued + len(prompts) > max(max_queue, len(prompts)):
                raise QueueFull(self._embeds_queued, max_queue, 1)
            self._embeds_queued += len(prompts)
        self._commands.put(job)
        self._wake.set()
        try:
            return await asyncio.shield(job.future)
        finally:
            if not job.future.done():
                job.future.cancel()  # the client left: the engine thread drops the rest

    def _embed_one(self) -> None:
        """The next prompts of the oldest embedding request, up to --max-batch-tokens (at least one) in
        one forward (engine thread)."""
        job = self._embeds[0]
        if job.future.cancelled():  # the client left
            self._embeds.pop(0)
            self._embedded(len(job.prompts) - len(job.done))
            return
        start = end = len(job.done)
        tokens, budget = 0, min(self._engine.config.max_batch_tokens, EMBED_BATCH_TOKENS)
        while end < len(job.prompts) and (end == start or tokens + len(job.prompts[end]) <= budget):
            tokens += len(job.prompts[end])
            end += 1
        try:
            job.done.extend(self._engine.runner.embed_many(job.prompts[start:end], job.pooling))
        except Exception as e:  # this request's failure, not the engine's
            log.exception("embedding failed")
            self._embeds.pop(0)
            self._embedded(len(job.prompts) - len(job.done))
            job.loop.call_soon_threadsafe(_settle, job.future, None, RuntimeError(f"embedding failed: {e}"))
            return
        self._embedded(end - start)
        if len(job.done) == len(job.prompts):
            self._embeds.pop(0)
            job.loop.call_soon_threadsafe(_settle, job.future, job.done, None)

    def _embedded(self, count: int) -> None:
        with self._lock:
            self._embeds_queued -= count

    def _admit(self, new: int, max_queue: int | None) -> None:
        """One waiting count: queued here plus the scheduler's; free running slots take some at once."""
        if max_queue is None:
            return
        waiting = self._queued + self._engine.num_waiting_seqs
        free = max(0, self._engine.config.max_num_seqs - self._engine.scheduler.num_running)
        if waiting + new - free > max_queue:
            raise QueueFull(waiting, max_queue, self._retry_after(waiting + new - free - max_queue))

    def check_stuck(self, timeout: float) -> bool:
        """True (and every request failed in-band, the engine marked dead) once a step has run longer
        than `timeout` seconds: a hung kernel or a deadlock must not hang every client with it."""
        started = self._step_started
        if self.error is None and started is not None and time.monotonic() - started > timeout:
            self.error = f"engine failure: a step has not returned for {timeout:g} s"
            log.error("%s", self.error)
            self._fail_pending(EngineDeadError(self.error))
        return self.error is not None

    def fail_all(self, message: str) -> None:
        """Finish every request now with `message` as an in-band error (e.g. at the drain deadline)."""
        self._commands.put(_FailAll(message))
        self._wake.set()

    def _retry_after(self, excess: int) -> int:
        """Seconds until `excess` more sequences have left the queue, at the rate sequences have been
        finishing over the last minute (before any has: queued tokens over the token rate); 1..60."""
        done = self._done_times
        now = time.monotonic()
        if len(done) >= 2 and now > done[0]:
            wait = excess / (len(done) / (now - done[0]))
        else:
            rate = self._stats.tokens_per_second
            wait = excess * self._avg_completion_tokens / rate if rate > 0 else 1.0
        return min(60, max(1, math.ceil(wait)))

    def _close(self, ids: list[str], unfinished: set[int]) -> None:
        with self._lock:
            for request_id in ids:
                self._targets.pop(request_id, None)
        for i in sorted(unfinished):
            self._commands.put(_Abort(ids[i]))
        if unfinished:
            unfinished.clear()
            self._wake.set()

    def _finished(self, out: RequestOutput) -> None:
        per_seq = out.completion_tokens / max(1, len(out.outputs))
        self._avg_completion_tokens = 0.9 * self._avg_completion_tokens + 0.1 * per_seq

    # -- the engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop:
            try:
                self._apply_commands()
                if self._embeds:  # watched like a step (--step-timeout)
                    self._step_started = time.monotonic()
                    self._embed_one()
                    self._step_started = None
                if not self._engine.has_unfinished:
                    if self._embeds:
                        continue
                    self._update_stats(0)
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                self._step_started = time.monotonic()
                outputs = self._engine.step()
                self._step_started = None
            except Exception as e:  # a model, kernel or engine bug: fail requests, never hang them
                log.exception("engine step failed")
                self.error = f"engine failure: {type(e).__name__}: {e}"
                self._deliver(self._engine.fail_all(self.error))
                self._fail_pending(EngineDeadError(self.error))
                return
            self._deliver(outputs)
            self._update_stats(sum(len(c.token_ids) for o in outputs for c in o.outputs),
                               sum(c.finish_reason is not None for o in outputs for c in o.outputs))

    def _apply_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _FailAll):
                self._deliver(self._engine.fail_all(cmd.message))
                for job in self._embeds:
                    job.loop.call_soon_threadsafe(_settle, job.future, None, EngineDeadError(cmd.message))
                self._embedded(sum(len(j.prompts) - len(j.done) for j in self._embeds))
                self._embeds.clear()
                continue
            if isinstance(cmd, _Embed):
                self._embeds.append(cmd)
                continue
            if isinstance(cmd, _Abort):
                out = self._engine.abort_request(cmd.request_id)
                if out is not None:
                    self._deliver([out])
                continue
            with self._lock:
                self._queued -= cmd.params.n
                wanted = cmd.request_id in self._targets  # the client may have left already
            if wanted:
                try:
                    self._engine.add_request(cmd.request_id, cmd.prompt, cmd.params, cmd.grammar)
                except ValueError as e:
                    self._push(cmd.request_id, e)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs to their streams: one wake-up of each event loop per step, not one per
        request (at 64 streams that was 64 writes to the loop's self-pipe a step)."""
        batches: _Batches = {}
        for out in outputs:
            self._push(out.request_id, out, batches)
        for loop, items in batches.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _push(self, request_id: str, item: object, batches: _Batches | None = None) -> None:
        with self._lock:
            target = self._targets.get(request_id)
        if target is None:
            return
        if target.queue.qsize() > MAX_UNREAD and isinstance(item, RequestOutput) and not item.finished:
            with self._lock:
                self._targets.pop(request_id, None)  # nothing more for it; its consumer sees the error
            out = self._engine.abort_request(request_id)
            if out is not None:  # counted as finished, so the stream ends after the error
                out.error = (f"the client read nothing of its last {MAX_UNREAD} deltas: the request was "
                             "stopped rather than buffered without bound")
                target.loop.call_soon_threadsafe(target.queue.put_nowait, (target.index, out))
            return
        if batches is None:
            target.loop.call_soon_threadsafe(target.queue.put_nowait, (target.index, item))
        else:
            batches.setdefault(target.loop, []).append((target.queue, (target.index, item)))

    def _fail_pending(self, error: BaseException) -> None:
        with self._lock:
            targets = list(self._targets.values())
        for t in targets:
            t.loop.call_soon_threadsafe(t.queue.put_nowait, (t.index, error))
        for job in list(self._embeds):  # settling twice is harmless; the engine thread owns the list
            job.loop.call_soon_threadsafe(_settle, job.future, None, error)

    def _update_stats(self, new_tokens: int, finished: int = 0) -> None:
        now = time.monotonic()
        done = self._done_times  # replaced, never changed in place: the event loop reads it (_retry_after)
        if finished or (done and now - done[0] >= 60.0):
            self._done_times = [t for t in done if now - t < 60.0] + [now] * finished
        # The rate over the last 10 s in O(1) a step (rebuilding the list took ~0.15 ms a step at 200
        # steps a second): tokens of every step after the window's first, over the time since it.
        recent = self._recent
        if new_tokens:
            recent.append((now, new_tokens))
            self._recent_tokens += new_tokens
        while recent and now - recent[0][0] >= 10.0:
            self._recent_tokens -= recent.popleft()[1]
        span = now - recent[0][0] if len(recent) > 1 else 0.0
        rate = (self._recent_tokens - recent[0][1]) / span if span > 0 else 0.0
        engine = self._engine
        bm, sched = engine.block_manager, engine.scheduler
        running_requests = len({s.request_id for s in sched.running})
        self._stats = EngineStats(sched.num_running, running_requests, engine.num_waiting_seqs, bm.usage,
                                  bm.prefix_query_tokens, bm.prefix_hit_tokens, rate, sched.num_preemptions,
                                  engine.num_blocks - bm.num_free_blocks)
