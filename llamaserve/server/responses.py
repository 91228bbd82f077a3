"""OpenAI's Responses API: POST /v1/responses, stateless.

A formatter: `input` (a string, or message / function_call / function_call_output items) and
`instructions` become a ChatCompletionRequest, run on the one serving path (routes.start_chat), and the
choice deltas come back as output items (a message with output_text, function calls) or as the Responses
stream's events, each with its `type` and `sequence_number`. Nothing is stored: a client resends the
history; `previous_response_id` and `store: true` are refused with 400 rather than half-honoured.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import ConfigDict, Field, model_validator

from llamaserve.engine.async_engine import EngineDeadError
from llamaserve.server.protocol import ChatCompletionRequest, StrictRequest, Usage, chat_request
from llamaserve.server.routes import ChatRun, collect_choices, split_calls, start_chat, state_of
from llamaserve.server.serving import SSE_OR_JSON, choice_deltas, framed, record
from llamaserve.server.tools import ToolCallParser

router = APIRouter()


class TextPart(StrictRequest):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None  # an earlier output's, sent back as history
    logprobs: list[Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") not in ("input_text", "output_text"):
            raise ValueError(f"content part of type {data.get('type')!r} is not supported (text only)")
        return data


class MessageItem(StrictRequest):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[TextPart]
    id: str | None = None
    status: str | None = None
    phase: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(StrictRequest):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(StrictRequest):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[TextPart]
    id: str | None = None
    status: str | None = None

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


Item = Annotated[MessageItem | FunctionCallItem | FunctionCallOutputItem, Field(discriminator="type")]


class FunctionTool(StrictRequest):
    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # arguments always follow the schema here


class NamedFunction(StrictRequest):
    type: Literal["function"]
    name: str


class TextFormat(StrictRequest):
    model_config = ConfigDict(json_schema_extra={  # the schema says what to_chat checks
        "if": {"properties": {"type": {"const": "json_schema"}}},
        "then": {"required": ["name", "schema"], "properties": {"name": {"type": "string", "minLength": 1},
                                                                "schema": {"type": "object"}}}})

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(StrictRequest):
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None  # the default; "low"/"high" are not honoured: refused


class ResponsesRequest(StrictRequest):
    # The schema says what to_chat checks: "required" or a named function needs tools.
    model_config = ConfigDict(json_schema_extra={
        "if": {"required": ["tool_choice"], "properties": {"tool_choice": {
            "not": {"enum": [None, "none", "auto"]}}}},
        "then": {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}}})

    model: str | None = None
    input: str | Annotated[list[Item], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool = False
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None  # the prefix cache needs no hint
    service_tier: Literal["auto", "default"] | None = None
    truncation: Literal["disabled"] | None = None
    include: list[Any] | None = Field(default=None, max_length=0)
    store: Literal[False] | None = None
    previous_response_id: None = None
    reasoning: None = None
    background: Literal[False] | None = None

    @model_validator(mode="before")
    @classmethod
    def _refused(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if data.get("previous_response_id") is not None:
            raise ValueError(f"previous_response_id {data['previous_response_id']!r}: this server keeps no "
                             "responses; send the whole conversation in 'input'")
        if data.get("store") is True:
            raise ValueError("'store': true is not supported: this server keeps no responses")
        for name, what in (("reasoning", "reasoning options"), ("background", "background responses"),
                           ("include", "extra output to include"), ("truncation", "truncation 'auto'")):
            value = data.get(name)
            if value not in (None, False, [], "disabled"):
                raise ValueError(f"'{name}' is not supported by this server ({what})")
        items = data.get("input")
        for item in items if isinstance(items, list) else []:
            if isinstance(item, dict) and "type" not in item and "role" in item:
                item["type"] = "message"  # an easy input message may leave out its type
            elif isinstance(item, dict) and item.get("type") not in ("message", "function_call",
                                                                      "function_call_output"):
                raise ValueError(f"input items of type {item.get('type')!r} are not supported")
        for tool in data.get("tools") or []:
            if isinstance(tool, dict) and tool.get("type") != "function":
                raise ValueError(f"tools of type {tool.get('type')!r} are not supported (function only)")
        return data

    def to_chat(self) -> ChatCompletionRequest:
        messages: list[dict[str, Any]] = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
        items = [MessageItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        for item in items:
            if isinstance(item, MessageItem):
                messages.append({"role": item.role, "content": item.text()})
            elif isinstance(item, FunctionCallItem):
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant":
                    last.setdefault("tool_calls", []).append(call)
                else:
                    messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
            else:
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
        body: dict[str, Any] = {"model": self.model, "messages": messages}
        for ours, value in (("max_tokens", self.max_output_tokens), ("temperature", self.temperature),
                            ("top_p", self.top_p), ("parallel_tool_calls", self.parallel_tool_calls),
                            ("user", self.user)):
            if value is not None:
                body[ours] = value
        if self.tools:
            body["tools"] = [{"type": "function", "function": t.model_dump(exclude_none=True,
                                                                           exclude={"type", "strict"})}
                             for t in self.tools]
        if isinstance(self.tool_choice, NamedFunction):
            body["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        elif self.tool_choice is not None and (self.tools or self.tool_choice == "required"):
            body["tool_choice"] = self.tool_choice  # "auto" or "none" without tools: nothing to choose
        fmt = self.text.format if self.text else None
        if fmt is not None and fmt.type == "json_object":
            body["response_format"] = {"type": "json_object"}
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.schema_ is None or not fmt.name:
                raise ValueError("text.format of type json_schema needs 'name' and 'schema'")
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": fmt.name,
                                                                              "schema": fmt.schema_}}
        return chat_request(body)


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _usage(u: Usage) -> dict[str, Any]:
    cached = (u.prompt_tokens_details or {}).get("cached_tokens", 0)
    return {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u.total_tokens}


def _envelope(req: ResponsesRequest, rid: str, created: int, model: str) -> dict[str, Any]:
    """The response object's fields that do not depend on the output."""
    tool_choice: Any = req.tool_choice.model_dump() if isinstance(req.tool_choice, NamedFunction) else (
        req.tool_choice or "auto")
    return {"id": rid, "object": "response", "created_at": created, "status": "in_progress", "model": model,
            "output": [], "error": None, "incomplete_details": None, "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens, "temperature": req.temperature, "top_p": req.top_p,
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or []], "tool_choice": tool_choice,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "text": {"format": req.text.format.model_dump(by_alias=True, exclude_none=True)
                     if req.text and req.text.format else {"type": "text"}},
            "previous_response_id": None, "store": False, "truncation": "disabled",
            "metadata": req.metadata or {}, "usage": None, "user": req.user}


def _finish(envelope: dict[str, Any], output: list[dict[str, Any]], finish_reason: str | None,
            totals: Usage) -> dict[str, Any]:
    incomplete = finish_reason == "length"
    if incomplete and output:  # the item max_output_tokens cut is incomplete too, as OpenAI marks it
        output[-1]["status"] = "incomplete"
    text = "".join(p["text"] for item in output if item["type"] == "message" for p in item["content"])
    return envelope | {"status": "incomplete" if incomplete else "completed", "output": output,
                       "output_text": text, "usage": _usage(totals), "completed_at": int(time.time()),
                       "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


@router.post("/v1/responses", response_model=None, responses=SSE_OR_JSON)
async def responses(req: ResponsesRequest, request: Request) -> dict[str, Any] | StreamingResponse:
    state = state_of(request)
    run = await start_chat(request, req.to_chat())
    rid, created = _id("resp"), int(time.time())
    envelope = _envelope(req, rid, created, state.model_name)
    if req.stream:
        return StreamingResponse(_stream(request, run, envelope), media_type="text/event-stream")
    choices = await collect_choices(request, run)
    totals = record(request, state, rid, run.stream)
    c = choices[0] if choices else None
    text, calls = split_calls(c.text if c else "", run.plan)
    output: list[dict[str, Any]] = []
    if text:
        output.append({"id": _id("msg"), "type": "message", "status": "completed", "role": "assistant",
                       "content": [_text_part(text)]})
    for call in calls or []:
        output.append({"id": _id("fc"), "type": "function_call", "status": "completed",
                       "call_id": call.id, "name": call.function.name, "arguments": call.function.arguments})
    return _finish(envelope, output, c.finish_reason if c else None, totals)


def _stream(request: Request, run: ChatRun, envelope: dict[str, Any]) -> AsyncIterator[bytes]:
    state = state_of(request)
    parser = ToolCallParser(run.plan.native) if run.plan else None
    seq = {"n": 0}
    output: list[dict[str, Any]] = []  # finished items
    current: dict[str, Any] = {}  # the open item
    end: dict[str, Any] = {"reason": None}

    def event(kind: str, payload: dict[str, Any]) -> bytes:
        data = {"type": kind, "sequence_number": seq["n"]} | payload
        seq["n"] += 1
        return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()

    def close_item() -> list[bytes]:
        if not current:
            return []
        item, index = dict(current), len(output)
        current.clear()
        out = []
        if item["type"] == "message":
            text = item.pop("_text")
            part = _text_part(text)
            common = {"item_id": item["id"], "output_index": index, "content_index": 0}
            out += [event("response.output_text.done", common | {"text": text, "logprobs": []}),
                    event("response.content_part.done", common | {"part": part})]
            item["content"] = [part]
        else:
            out.append(event("response.function_call_arguments.done", {
                "item_id": item["id"], "output_index": index, "name": item["name"],
                "arguments": item["arguments"]}))
        item["status"] = "incomplete" if end["reason"] == "length" else "completed"
        output.append(item)
        return out + [event("response.output_item.done", {"output_index": index, "item": item})]

    def open_item(item: dict[str, Any]) -> list[bytes]:
        out = close_item()
        current.update(item)
        shown = {k: v for k, v in item.items() if not k.startswith("_")}
        out.append(event("response.output_item.added", {"output_index": len(output), "item": shown}))
        if item["type"] == "message":
            out.append(event("response.content_part.added", {
                "item_id": item["id"], "output_index": len(output), "content_index": 0,
                "part": _text_part("")}))
        return out

    async def body() -> AsyncGenerator[bytes, None]:
        yield event("response.created", {"response": envelope})
        yield event("response.in_progress", {"response": envelope})
        async for d in choice_deltas(run.stream, 1):
            text, calls = parser.feed(d.text) if parser else (d.text, [])
            if text:
                if current.get("type") != "message":
                    for e in open_item({"id": _id("msg"), "type": "message", "status": "in_progress",
                                        "role": "assistant", "content": [], "_text": ""}):
                        yield e
                current["_text"] += text
                yield event("response.output_text.delta", {"item_id": current["id"],
                                                           "output_index": len(output), "content_index": 0,
                                                           "delta": text, "logprobs": []})
            for call in calls:
                if call.id:
                    for e in open_item({"id": _id("fc"), "type": "function_call", "status": "in_progress",
                                        "call_id": call.id, "name": call.function.name, "arguments": ""}):
                        yield e
                if call.function.arguments:
                    current["arguments"] += call.function.arguments
                    yield event("response.function_call_arguments.delta", {
                        "item_id": current["id"], "output_index": len(output),
                        "delta": call.function.arguments})
            if d.finish_reason is not None:
                end["reason"] = d.finish_reason
        for e in close_item():
            yield e

    def tail(totals: Usage) -> list[bytes]:
        if end.get("failed"):
            return []
        final = _finish(envelope, output, end["reason"], totals)
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        return [event(kind, {"response": final})]

    def error(e: Exception) -> bytes:
        end["failed"] = True
        code = "engine_failed" if isinstance(e, EngineDeadError) else "invalid_request"
        failed = envelope | {"status": "failed", "output": output, "error": {"code": "server_error"
                                                                             if code == "engine_failed"
                                                                             else "invalid_prompt",
                                                                             "message": str(e)}}
        return (event("error", {"code": code, "message": str(e), "param": None})
                + event("response.failed", {"response": failed}))

    return framed(request, state, envelope["id"], run.stream, body(), error, tail)
