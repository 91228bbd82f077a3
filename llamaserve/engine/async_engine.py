"""One engine thread stepping the LLMEngine; per-request asyncio queues carry deltas to the server."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from llamaserve.engine.llm_engine import LLMEngine
from llamaserve.engine.outputs import RequestOutput
from llamaserve.engine.sampling_params import SamplingParams

log = logging.getLogger("llamaserve.engine")


class EngineDeadError(RuntimeError):
    """The engine thread failed; no request can be served until a restart."""


@dataclass(slots=True)
class EngineStats:
    num_running: int  # sequences
    num_running_requests: int
    num_waiting: int
    kv_cache_usage: float
    prefix_query_tokens: int
    prefix_hit_tokens: int
    tokens_per_second: float  # recent generation throughput, for Retry-After estimates
    num_preemptions: int = 0  # over the engine's lifetime


class AsyncEngine:
    """Thread-safe front of the engine: `generate` streams RequestOutputs, `abort` stops a request."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()  # ("add", ...) / ("abort", id) / ("stop",)
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.error: str | None = None
        self._recent: list[tuple[float, int]] = []  # (time, tokens generated in a step)
        self._stats = EngineStats(0, 0, 0, 0.0, 0, 0, 0.0)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llamaserve-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    @property
    def stats(self) -> EngineStats:
        return self._stats

    @property
    def num_in_flight(self) -> int:
        with self._lock:
            return len(self._streams)

    @property
    def num_waiting_requests(self) -> int:
        """Accepted requests that are not running yet (queued here or in the scheduler)."""
        return max(0, self.num_in_flight - self._stats.num_running_requests)

    # -- requests -------------------------------------------------------------------------------
    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Enqueue, then yield deltas until the request finishes; a bad request raises ValueError."""
        if self.error is not None:
            raise EngineDeadError(self.error)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = (loop, q)
        self._commands.put(("add", request_id, prompt_token_ids, params))
        self._wake.set()
        finished = False
        try:
            while True:
                out = await q.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:  # the consumer went away (client disconnect, cancellation)
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    # -- the engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop:
            try:
                self._apply_commands()
                if not self.engine.has_unfinished:
                    self._update_stats(0)
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                outputs = self.engine.step()
            except Exception as e:  # a model, kernel or engine bug: fail requests, never hang them
                log.exception("engine step failed")
                self.error = f"engine failure: {type(e).__name__}: {e}"
                self._deliver(self.engine.fail_all(self.error))
                self._fail_pending(EngineDeadError(self.error))
                return
            self._deliver(outputs)
            self._update_stats(sum(len(c.token_ids) for o in outputs for c in o.outputs))

    def _apply_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, prompt, params = cmd
                with self._lock:
                    wanted = rid in self._streams  # the client may have left already
                if not wanted:
                    continue
                try:
                    self.engine.add_request(rid, prompt, params)
                except ValueError as e:
                    self._push(rid, e)
            else:
                out = self.engine.abort_request(cmd[1])
                if out is not None:
                    self._deliver([out])

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self._push(out.request_id, out)

    def _push(self, request_id: str, item: object) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _fail_pending(self, error: BaseException) -> None:
        with self._lock:
            targets = list(self._streams.values())
        for loop, q in targets:
            loop.call_soon_threadsafe(q.put_nowait, error)

    def _update_stats(self, new_tokens: int) -> None:
        now = time.monotonic()
        if new_tokens:
            self._recent.append((now, new_tokens))
        self._recent = [(t, n) for t, n in self._recent if now - t < 10.0]
        span = now - self._recent[0][0] if len(self._recent) > 1 else 0.0
        rate = sum(n for _, n in self._recent[1:]) / span if span > 0 else 0.0
        bm, sched = self.engine.block_manager, self.engine.scheduler
        running_requests = len({s.request_id for s in sched.running})
        self._stats = EngineStats(sched.num_running, running_requests, sched.num_waiting, bm.usage,
                                  bm.prefix_query_tokens, bm.prefix_hit_tokens, rate, sched.num_preemptions)
