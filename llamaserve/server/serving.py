"""The one serving path: a request's engine stream as typed choice deltas, streamed or collected.

Every API formats these deltas; none talks to the engine another way.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel
from starlette.requests import Request

from llamaserve.engine.async_engine import EngineDeadError, RequestStream
from llamaserve.engine.outputs import TokenLogprob
from llamaserve.loader.tokenizer import Tokenizer
from llamaserve.server.protocol import Usage, error_body, usage

if TYPE_CHECKING:
    from llamaserve.server.app import AppState

T = TypeVar("T")
SSE_DONE = b"data: [DONE]\n\n"

# What a route that can stream documents for its 200: JSON, or the stream when "stream" says so.
SSE_OR_JSON: dict[int | str, dict[str, Any]] = {200: {
    "content": {"application/json": {}, "text/event-stream": {}},
    "description": "JSON, or server-sent events with \"stream\": true"}}
NDJSON_OR_JSON: dict[int | str, dict[str, Any]] = {200: {
    "content": {"application/json": {}, "application/x-ndjson": {}},
    "description": "NDJSON lines (the default), or JSON with \"stream\": false"}}


@dataclass(slots=True)
class ChoiceDelta:
    """What one engine step added to one choice (index counts over prompts x n)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None
    stop_reason: str | int | None


@dataclass(slots=True)
class Choice:
    """One choice's accumulated text, tokens and logprobs."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


async def choice_deltas(stream: RequestStream, n: int) -> AsyncIterator[ChoiceDelta]:
    """The engine's outputs of every prompt as choice deltas; closing it aborts what has not finished."""
    try:
        async for i, out in stream:
            for c in out.outputs:
                yield ChoiceDelta(i * n + c.index, c.text, c.token_ids, c.logprobs or [], c.finish_reason,
                                  c.stop_reason)
    finally:
        stream.close()


async def collect(stream: RequestStream, n: int, num_prompts: int) -> list[Choice]:
    choices = [Choice(i) for i in range(n * num_prompts)]
    async for d in choice_deltas(stream, n):
        c = choices[d.index]
        c.text += d.text
        c.token_ids += d.token_ids
        c.logprobs += d.logprobs
        if d.finish_reason is not None:
            c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
    return choices


class ClientDisconnected(Exception):
    """The client closed the connection before the response was ready."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it when the client disconnects (the ASGI server says so: no polling)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    try:
        return await task
    except asyncio.CancelledError:
        raise ClientDisconnected from None


def record(request: Request, state: AppState, rid: str, stream: RequestStream) -> Usage:
    """Metrics and the access-log fields of a finished request; returns its usage."""
    u = stream.usage
    ttft = stream.ttft
    request.state.run_info = {"id": rid, "prompt_tokens": u.prompt_tokens,
                              "completion_tokens": u.completion_tokens,
                              "ttft": None if ttft is None else round(ttft, 4)}
    state.metrics.observe_request(ttft, time.monotonic() - stream.started, u.prompt_tokens,
                                  u.completion_tokens)
    return usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens)


async def framed(request: Request, state: AppState, rid: str, stream: RequestStream,
                 body: AsyncGenerator[bytes, None], error_event: Callable[[Exception], bytes],
                 tail: Callable[[Usage], list[bytes]]) -> AsyncIterator[bytes]:
    """An API's chunks, then what every stream ends with, in that API's format: an in-band error if the
    run failed (the 200 header has gone out already), the metrics (also when the client leaves), and the
    API's closing events, given the usage."""
    try:
        async for chunk in body:
            yield chunk
    except (ValueError, RuntimeError) as e:
        yield error_event(e)
    finally:
        await body.aclose()  # closes the engine stream too (choice_deltas' own finally)
        totals = record(request, state, rid, stream)
    for chunk in tail(totals):
        yield chunk


def sse_frame(request: Request, state: AppState, rid: str, stream: RequestStream,
              body: AsyncGenerator[bytes, None],
              usage_chunk: Callable[[Usage], bytes] | None) -> AsyncIterator[bytes]:
    """OpenAI's stream ending: an in-band error event, the usage chunk if asked for, [DONE]."""
    return framed(request, state, rid, stream, body, sse_error,
                  lambda u: ([usage_chunk(u)] if usage_chunk is not None else []) + [SSE_DONE])


def sse(payload: BaseModel | dict[str, Any]) -> bytes:
    """One server-sent event; a chunk's usage appears only in the usage chunk."""
    if isinstance(payload, BaseModel):
        payload = payload.model_dump(mode="json")
        if payload.get("usage", 0) is None:
            del payload["usage"]
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def sse_error(e: Exception) -> bytes:
    """An error in the stream itself: the 200 header has gone out already."""
    if isinstance(e, EngineDeadError):
        return sse(error_body(str(e), "service_unavailable", None, "engine_failed"))
    return sse(error_body(str(e), "invalid_request_error"))


def _token_text(tokenizer: Tokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)


def chat_logprobs(tokenizer: Tokenizer, lps: list[TokenLogprob]) -> dict[str, Any]:
    def entry(token: int, lp: float) -> dict[str, Any]:
        text = _token_text(tokenizer, token)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    return {"content": [entry(x.token_id, x.logprob) | {"top_logprobs": [entry(t, v) for t, v in x.top]}
                        for x in lps]}


def completion_logprobs(tokenizer: Tokenizer, lps: list[TokenLogprob], offset: int) -> dict[str, Any]:
    tokens = [_token_text(tokenizer, x.token_id) for x in lps]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [x.logprob for x in lps],
            "top_logprobs": [{_token_text(tokenizer, t): v for t, v in x.top} for x in lps],
            "text_offset": offsets}
