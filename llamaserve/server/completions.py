"""The generating routes' logic: prompt -> engine stream -> OpenAI JSON or SSE chunks."""

from __future__ import annotations

import asyncio
import copy
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from llamaserve.engine.async_engine import EngineDeadError
from llamaserve.engine.outputs import RequestOutput, TokenLogprob
from llamaserve.engine.sampling_params import SamplingParams
from llamaserve.server.protocol import error_body


@dataclass(slots=True)
class Choice:
    """One choice's accumulated text, tokens and logprobs."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass(slots=True, eq=False, weakref_slot=True)
class Run:
    """One HTTP request's generation: possibly several engine requests (a list of prompts)."""

    prompts: list[list[int]]
    params: SamplingParams
    started: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None
    unstarted: int = field(init=False)  # engine requests not handed to the engine yet

    def __post_init__(self) -> None:
        self.unstarted = len(self.prompts)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.started


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


async def stream_outputs(engine: Any, run: Run) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Merge the engine streams of every prompt; yields (prompt index, delta)."""
    queue: asyncio.Queue = asyncio.Queue()
    rid = new_id("req")

    async def pump(i: int, prompt: list[int]) -> None:
        run.unstarted -= 1  # engine.generate registers the request in this same step (no await before)
        try:
            async for out in engine.generate(f"{rid}-{i}", prompt, _copy_params(run.params)):
                await queue.put((i, out))
        except BaseException as e:  # delivered to the consumer, which re-raises it
            await queue.put((i, e))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(run.prompts)]
    done = 0
    try:
        while done < len(tasks):
            i, item = await queue.get()
            if item is None:
                done += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                if run.first_token is None and any(c.token_ids for c in item.outputs):
                    run.first_token = time.monotonic()
                yield i, item
                if item.error:  # the engine failed and finished every request with this message
                    raise EngineDeadError(item.error)
    finally:
        run.unstarted = 0  # a pump cancelled before its first step never reaches the engine
        for t in tasks:  # a disconnect or an error cancels the rest (their engine requests abort)
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _copy_params(p: SamplingParams) -> SamplingParams:
    return copy.deepcopy(p)


class ClientDisconnected(Exception):
    """The client closed the connection before the response was ready."""


async def collect(engine: Any, run: Run, request: Request) -> list[Choice]:
    """Run to completion (non-streaming); a client that disconnects aborts the run."""
    n = run.params.n
    choices = [Choice(i) for i in range(n * len(run.prompts))]
    final: dict[int, RequestOutput] = {}

    async def consume() -> None:
        async for i, out in stream_outputs(engine, run):
            for c in out.outputs:
                choice = choices[i * n + c.index]
                choice.text += c.text
                choice.token_ids += c.token_ids
                choice.logprobs += c.logprobs or []
                if c.finish_reason is not None:
                    choice.finish_reason, choice.stop_reason = c.finish_reason, c.stop_reason
            final[i] = out

    task = asyncio.create_task(consume())
    while not task.done():
        await asyncio.wait({task}, timeout=0.5)
        if not task.done() and await request.is_disconnected():
            task.cancel()
    if task.cancelled():
        raise ClientDisconnected
    task.result()  # re-raises a failure of the run
    account(run, final.values())
    return choices


def account(run: Run, outs: Any) -> None:
    outs = list(outs)
    run.prompt_tokens = sum(o.prompt_tokens for o in outs)
    run.completion_tokens = sum(o.completion_tokens for o in outs)
    run.cached_tokens = sum(o.cached_tokens for o in outs)
    errors = [o.error for o in outs if o.error]
    run.error = errors[0] if errors else None


def sse(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def sse_error(e: Exception) -> bytes:
    """An error in the stream itself: the 200 header has gone out already."""
    if isinstance(e, EngineDeadError):
        return sse(error_body(str(e), "service_unavailable", None, "engine_failed"))
    return sse(error_body(str(e), "invalid_request_error"))


SSE_DONE = b"data: [DONE]\n\n"
