"""Anthropic's Messages API: POST /v1/messages and /v1/messages/count_tokens.

A formatter: the request becomes a ChatCompletionRequest (system, text, tool_use and tool_result blocks
mapped onto chat messages and tool calls), runs on the one serving path (routes.start_chat), and its
choice deltas come back as Anthropic's content blocks and stream events. Errors on these routes are in
Anthropic's shape ({"type": "error", "error": {...}}, see protocol.error_for_path).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from llamaserve.engine.async_engine import EngineDeadError
from llamaserve.server.protocol import (
    ChatCompletionRequest,
    StrictRequest,
    Usage,
    anthropic_error,
    chat_request,
)
from llamaserve.server.routes import ChatRun, chat_prompt, collect_choices, split_calls, start_chat, state_of
from llamaserve.server.serving import SSE_OR_JSON, choice_deltas, framed, record
from llamaserve.server.tools import ToolCallParser

router = APIRouter()


class CacheControl(StrictRequest):
    type: Literal["ephemeral"]
    ttl: str | None = None  # prefix caching here is automatic: the hint asks for what happens anyway


class TextBlock(StrictRequest):
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None
    citations: None = None


class ToolUseBlock(StrictRequest):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: CacheControl | None = None
    caller: dict[str, Any] | None = None  # the SDK's own blocks, sent back as history, carry these
    toolset_name: None = None


class ToolResultBlock(StrictRequest):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool = False
    cache_control: CacheControl | None = None

    def text(self) -> str:
        body = self.content if isinstance(self.content, str) else "".join(b.text for b in self.content or [])
        return f"Error: {body}" if self.is_error else body


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")]


class Message(StrictRequest):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Tool(StrictRequest):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: CacheControl | None = None


class ToolChoice(StrictRequest):
    model_config = ConfigDict(json_schema_extra={  # the schema says what _named checks
        "if": {"properties": {"type": {"const": "tool"}}},
        "then": {"required": ["name"], "properties": {"name": {"type": "string"}}},
        "else": {"properties": {"name": {"type": "null"}}}})

    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _named(self) -> ToolChoice:
        if (self.type == "tool") != (self.name is not None):
            raise ValueError("tool_choice: 'name' goes with type 'tool', and only with it")
        return self


class Metadata(StrictRequest):
    user_id: str | None = None


class Thinking(StrictRequest):
    """Accepted as Claude Code sends it by default; this server runs no thinking models, so an answer
    has no thinking blocks (which the API allows under every type)."""

    model_config = ConfigDict(extra="allow")  # its other settings tune thinking, which never happens here

    type: Literal["enabled", "disabled", "adaptive"]


class OutputFormat(StrictRequest):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(StrictRequest):
    effort: Literal["low", "medium", "high", "max"] | None = None  # a thinking budget: none to spend here
    format: OutputFormat | None = None  # structured output, through the grammar engine


class CountTokensRequest(StrictRequest):
    # The schema says what to_chat checks: tool_choice "any" or "tool" needs tools.
    model_config = ConfigDict(json_schema_extra={
        "if": {"required": ["tool_choice"], "properties": {"tool_choice": {
            "type": "object", "required": ["type"], "properties": {"type": {"enum": ["any", "tool"]}}}}},
        "then": {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}}})

    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    cache_control: CacheControl | None = None  # prefix caching is automatic here
    context_management: dict[str, Any] | None = None  # context editing: this server never edits it

    def chat_request(self, **sampling: Any) -> ChatCompletionRequest:
        """The same conversation as an OpenAI chat request (validated as one)."""
        messages: list[dict[str, Any]] = []
        if self.system:
            system = self.system if isinstance(self.system, str) else "\n".join(b.text for b in self.system)
            messages.append({"role": "system", "content": system})
        for m in self.messages:
            blocks = [TextBlock(type="text", text=m.content)] if isinstance(m.content, str) else m.content
            text = "\n".join(b.text for b in blocks if isinstance(b, TextBlock))
            if m.role == "assistant":
                if any(isinstance(b, ToolResultBlock) for b in blocks):
                    raise ValueError("an assistant message cannot hold a tool_result block (the user's)")
                calls = [{"id": b.id, "type": "function", "function": {"name": b.name,
                                                                       "arguments": json.dumps(b.input)}}
                         for b in blocks if isinstance(b, ToolUseBlock)]
                entry: dict[str, Any] = {"role": "assistant", "content": text}
                messages.append(entry | ({"tool_calls": calls} if calls else {}))
                continue
            for b in blocks:
                if isinstance(b, ToolUseBlock):
                    raise ValueError("a user message cannot hold a tool_use block (the assistant's)")
                if isinstance(b, ToolResultBlock):
                    messages.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": b.text()})
            if text or not any(isinstance(b, ToolResultBlock) for b in blocks):
                messages.append({"role": "user", "content": text})
        body: dict[str, Any] = {"model": self.model, "messages": messages, **sampling}
        if messages[-1]["role"] == "assistant":  # a prefill: the answer continues it
            body["continue_final_message"] = True
        if self.output_config and self.output_config.format:
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "output", "schema": self.output_config.format.schema_}}
        if self.tools:
            body["tools"] = [{"type": "function", "function": {"name": t.name, "parameters": t.input_schema}
                              | ({"description": t.description} if t.description else {})}
                             for t in self.tools]
        if self.tool_choice is not None and (self.tools or self.tool_choice.type in ("any", "tool")):
            c = self.tool_choice
            body["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(c.type) or {
                "type": "function", "function": {"name": c.name}}
            if c.disable_parallel_tool_use and self.tools:
                body["parallel_tool_calls"] = False
        return chat_request(body)


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[Annotated[str, Field(min_length=1)]] | None = Field(default=None, max_length=16)
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1)
    stream: bool = False
    metadata: Metadata | None = None
    service_tier: Literal["auto", "standard_only"] | None = None

    def to_chat(self) -> ChatCompletionRequest:
        sampling: dict[str, Any] = {"max_tokens": self.max_tokens}
        for ours, value in (("temperature", self.temperature), ("top_p", self.top_p), ("top_k", self.top_k),
                            ("stop", self.stop_sequences)):
            if value is not None:
                sampling[ours] = value
        if self.metadata and self.metadata.user_id:
            sampling["user"] = self.metadata.user_id
        return self.chat_request(**sampling)


# -- responses ------------------------------------------------------------------------------------
class AnthropicUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0


def _usage(u: Usage) -> AnthropicUsage:
    cached = (u.prompt_tokens_details or {}).get("cached_tokens", 0)
    return AnthropicUsage(input_tokens=u.prompt_tokens - cached, output_tokens=u.completion_tokens,
                          cache_read_input_tokens=cached)


def _stop(finish_reason: str | None, stop_reason: str | int | None, called: bool) -> tuple[str, str | None]:
    """(Anthropic's stop_reason, stop_sequence) for our finish."""
    if finish_reason == "length":  # also when a call was cut short
        return "max_tokens", None
    if called:
        return "tool_use", None
    if isinstance(stop_reason, str):
        return "stop_sequence", stop_reason
    return "end_turn", None


def _input(arguments: str) -> Any:
    """A call's arguments as its input; {} for a call cut short by max_tokens (stop_reason says so)."""
    try:
        return json.loads(arguments or "{}")
    except json.JSONDecodeError:
        return {}


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


@router.post("/v1/messages", response_model=None, responses=SSE_OR_JSON)
async def messages(req: MessagesRequest, request: Request) -> dict[str, Any] | StreamingResponse:
    state = state_of(request)
    run = await start_chat(request, req.to_chat())
    mid = _id("msg")
    if req.stream:
        return StreamingResponse(_stream(request, run, mid), media_type="text/event-stream")
    choices = await collect_choices(request, run)
    totals = record(request, state, mid, run.stream)
    c = choices[0] if choices else None
    content: list[dict[str, Any]] = []
    text, calls = split_calls(c.text if c else "", run.plan)
    if text:
        content.append({"type": "text", "text": text})
    for call in calls or []:
        content.append({"type": "tool_use", "id": _id("toolu"), "name": call.function.name,
                        "input": _input(call.function.arguments)})
    reason, sequence = _stop(c.finish_reason if c else None, c.stop_reason if c else None, bool(calls))
    return {"id": mid, "type": "message", "role": "assistant", "model": state.model_name, "content": content,
            "stop_reason": reason, "stop_sequence": sequence, "usage": _usage(totals).model_dump()}


@router.post("/v1/messages/count_tokens")
async def count_tokens(req: CountTokensRequest, request: Request) -> dict[str, int]:
    state = state_of(request)
    state.check_model(req.model)
    return {"input_tokens": len(await chat_prompt(request, req.chat_request(max_tokens=1)))}


def _event(kind: str, payload: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind} | payload, separators=(',', ':'))}\n\n".encode()


def _stream(request: Request, run: ChatRun, mid: str) -> AsyncIterator[bytes]:
    """message_start, then per block content_block_start / _delta... / _stop, message_delta, message_stop."""
    state = state_of(request)
    parser = ToolCallParser(run.plan.native) if run.plan else None
    end: dict[str, Any] = {}
    block = {"index": -1, "open": False}

    def start(content_block: dict[str, Any]) -> list[bytes]:
        out = stop()
        block["index"] += 1
        block["open"] = True
        return out + [_event("content_block_start", {"index": block["index"],
                                                      "content_block": content_block})]

    def stop() -> list[bytes]:
        if not block["open"]:
            return []
        block["open"] = False
        return [_event("content_block_stop", {"index": block["index"]})]

    async def body() -> AsyncGenerator[bytes, None]:
        yield _event("message_start", {"message": {
            "id": mid, "type": "message", "role": "assistant", "model": state.model_name, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": run.prompt_tokens, "output_tokens": 0}}})
        kind = None  # the open block's type
        called = False
        async for d in choice_deltas(run.stream, 1):
            text, calls = parser.feed(d.text) if parser else (d.text, [])
            if text:
                if kind != "text":
                    for e in start({"type": "text", "text": ""}):
                        yield e
                    kind = "text"
                yield _event("content_block_delta", {"index": block["index"],
                                                     "delta": {"type": "text_delta", "text": text}})
            for call in calls:
                if call.id:  # a new call
                    called = True
                    for e in start({"type": "tool_use", "id": _id("toolu"), "name": call.function.name,
                                    "input": {}}):
                        yield e
                    kind = "tool_use"
                if call.function.arguments:
                    yield _event("content_block_delta", {"index": block["index"], "delta": {
                        "type": "input_json_delta", "partial_json": call.function.arguments}})
            if d.finish_reason is not None:
                end["reason"] = _stop(d.finish_reason, d.stop_reason, called)
        for e in stop():
            yield e

    def tail(totals: Usage) -> list[bytes]:
        if end.get("failed"):  # the error event ends the stream
            return []
        reason, sequence = end.get("reason", ("end_turn", None))
        return [_event("message_delta", {"delta": {"stop_reason": reason, "stop_sequence": sequence},
                                         "usage": _usage(totals).model_dump()}),
                _event("message_stop", {})]

    def error(e: Exception) -> bytes:
        end["failed"] = True
        return _event("error", {"error": anthropic_error(503 if isinstance(e, EngineDeadError) else 400,
                                                         str(e))["error"]})

    return framed(request, state, mid, run.stream, body(), error, tail)
