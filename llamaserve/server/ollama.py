"""Ollama's API: /api/tags, /api/show, /api/version, /api/ps, /api/chat, /api/generate, /api/embed.

A formatter: chat and generate requests become ChatCompletionRequests on the one serving path
(routes.start_chat; /api/generate with `raw` skips the chat template), streamed as NDJSON by default as
Ollama does, each line a JSON object and the last one `done: true` with Ollama's counters (durations in
nanoseconds). `options.num_ctx` is honoured as this request's context (larger than the model's is an
error, not a silent truncation); options this server does not implement are refused by name. Errors on
these routes are Ollama's {"error": "..."}.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import AliasChoices, Field, model_validator

from llamaserve.engine.async_engine import AsyncEngine
from llamaserve.server.embeddings import MAX_INPUTS, embed_texts
from llamaserve.server.protocol import (
    ChatCompletionRequest,
    FunctionCall,
    StrictRequest,
    ToolCall,
    ToolDefinition,
    Usage,
    chat_request,
)
from llamaserve.server.routes import (
    ChatRun,
    collect_choices,
    encode_text,
    split_calls,
    start_chat,
    start_prompt,
    state_of,
)
from llamaserve.server.serving import (
    NDJSON_OR_JSON,
    ClientDisconnected,
    choice_deltas,
    framed,
    new_id,
    record,
)
from llamaserve.server.tools import ToolCallParser

router = APIRouter()

OLLAMA_VERSION = "0.12.0"  # the API version these routes follow


class Options(StrictRequest):
    # -1: until a stop or the context is full; -2: fill the context; 0 is refused
    num_predict: int | None = Field(default=None, ge=-2, json_schema_extra={"not": {"const": 0}})
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = None
    stop: list[Annotated[str, Field(min_length=1)]] | None = None  # (an empty stop string would end at once)
    num_ctx: int | None = Field(default=None, ge=1)
    repeat_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)

    @model_validator(mode="after")
    def _no_zero(self) -> Options:
        if self.num_predict == 0:
            raise ValueError("options.num_predict must be positive, -1 or -2, got 0")
        return self

    def sampling(self, max_model_len: int) -> tuple[dict[str, Any], int | None]:
        """(chat-request sampling fields, context limit) — num_ctx above the model's is refused."""
        if self.num_ctx is not None and self.num_ctx > max_model_len:
            raise ValueError(f"options.num_ctx {self.num_ctx} is more than this model's context length "
                             f"({max_model_len})")
        out: dict[str, Any] = {}
        if self.num_predict is not None and self.num_predict > 0:
            out["max_tokens"] = self.num_predict
        elif self.num_predict == -2:
            out["ignore_eos"] = True  # fill the context
        elif self.num_predict is not None and self.num_predict != -1:
            raise ValueError(f"options.num_predict must be positive, -1 or -2, got {self.num_predict}")
        for ours, value in (("temperature", self.temperature), ("top_p", self.top_p), ("min_p", self.min_p),
                            ("seed", self.seed), ("repetition_penalty", self.repeat_penalty),
                            ("presence_penalty", self.presence_penalty),
                            ("frequency_penalty", self.frequency_penalty)):
            if value is not None:
                out[ours] = value
        if self.top_k:
            out["top_k"] = self.top_k
        if self.stop:
            out["stop"] = self.stop
        return out, self.num_ctx


class _Ollama(StrictRequest):
    model: str
    options: Options | None = None
    format: Literal["", "json"] | dict[str, Any] | None = None
    stream: bool = True
    keep_alive: str | int | float | None = Field(
        default=None, json_schema_extra={"not": {"enum": [0, "0", "0s", "0m"]}})  # 0: unload, refused
    think: Literal[False] | None = None

    @model_validator(mode="before")
    @classmethod
    def _loaded(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("keep_alive") in (0, "0", "0s", "0m"):
            raise ValueError("keep_alive 0 asks to unload the model; this server keeps its one model loaded")
        think = data.get("think") if isinstance(data, dict) else None
        if think is not None and think is not False:  # true, or 0 / "" that a Literal[False] would pass
            raise ValueError("'think' is not supported: this server runs no thinking models")
        return data

    def response_format(self) -> dict[str, Any] | None:
        if self.format == "json":
            return {"type": "json_object"}
        if isinstance(self.format, dict):
            return {"type": "json_schema", "json_schema": {"name": "format", "schema": self.format}}
        return None


class ToolFunction(StrictRequest):
    name: str
    arguments: dict[str, Any]
    index: int | None = None


class OllamaToolCall(StrictRequest):
    function: ToolFunction
    id: str | None = None
    type: Literal["function"] | None = None


class OllamaMessage(StrictRequest):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None
    images: list[Any] | None = Field(default=None, max_length=0)  # text only
    thinking: None = None


class ChatRequest(_Ollama):
    messages: list[OllamaMessage] = []  # none: Ollama's "load the model" request
    tools: list[ToolDefinition] | None = None  # OpenAI's format, as Ollama has it

    def to_chat(self, sampling: dict[str, Any]) -> ChatCompletionRequest:
        messages: list[dict[str, Any]] = []
        calls_seen = 0
        answered: set[str] = set()
        for m in self.messages:
            entry: dict[str, Any] = {"role": m.role, "content": m.content}
            if m.tool_calls:
                entry["tool_calls"] = []
                for c in m.tool_calls:
                    calls_seen += 1
                    entry["tool_calls"].append({"id": c.id or f"call_{calls_seen}", "type": "function",
                                                "function": {"name": c.function.name,
                                                             "arguments": json.dumps(c.function.arguments)}})
            if m.role == "tool":  # Ollama names the tool; chat messages point at the call
                entry["tool_call_id"] = _call_for(messages, m.tool_name, answered)
                answered.add(entry["tool_call_id"] or "")
            messages.append(entry)
        body: dict[str, Any] = {"model": self.model, "messages": messages, **sampling}
        if self.tools:
            body["tools"] = [t.model_dump(exclude_none=True) for t in self.tools]
        if self.response_format():
            body["response_format"] = self.response_format()
        return chat_request(body)


def _call_for(messages: list[dict[str, Any]], name: str | None, answered: set[str]) -> str | None:
    """The id of the earliest unanswered call of tool `name` (any tool if None) in the latest assistant
    message with calls: parallel results of one tool answer its calls in order."""
    for m in reversed(messages):
        calls = m.get("tool_calls") or []
        if calls:
            for c in calls:
                if (name is None or c["function"]["name"] == name) and c["id"] not in answered:
                    return str(c["id"])
            return None
    return None


class GenerateRequest(_Ollama):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    suffix: Literal[""] | None = None
    template: None = None
    context: list[int] | None = Field(default=None, max_length=0)
    images: list[Any] | None = Field(default=None, max_length=0)


class EmbedOptions(StrictRequest):
    """The one option that applies to embeddings; a sampling option is an unknown field here (400)."""

    num_ctx: int | None = Field(default=None, ge=1)


class EmbedRequest(StrictRequest):
    model: str
    input: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]],
                                                             Field(min_length=1, max_length=MAX_INPUTS)]
    # true: an input longer than the context (or options.num_ctx) is cut to fit, as asked; otherwise
    # (false, or not given) it is refused
    truncate: bool | None = None
    options: EmbedOptions | None = None  # num_ctx bounds the inputs; nothing is sampled
    keep_alive: str | int | float | None = None
    dimensions: None = None


class ShowRequest(StrictRequest):
    model: str = Field(validation_alias=AliasChoices("model", "name"))  # older clients send "name"
    verbose: bool | None = None


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _details(engine: AsyncEngine) -> dict[str, Any]:
    src = engine.source
    kind = src.kind if src is not None else "torch"
    quant = src.tensor_types.most_common(1)[0][0] if src is not None and src.tensor_types else "unknown"
    n = engine.model_config.num_parameters
    size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"
    fmt = {"gguf": "gguf", "hf": "safetensors"}.get(kind, kind)
    return {"parent_model": "", "format": fmt,
            "family": "llama", "families": ["llama"], "parameter_size": size, "quantization_level": quant}


def _model_entry(request: Request) -> dict[str, Any]:
    state = state_of(request)
    engine = state.ready_engine()
    src = engine.source
    path = src.path if src is not None else None
    size = path.stat().st_size if path is not None and path.is_file() else 0
    mtime = path.stat().st_mtime if path is not None else 0.0
    # An identifier of this file (path, size, time), not the sha256 of its bytes: hashing a 4 GB file
    # on every /api/tags is not worth it, and clients use the digest only to tell models apart.
    digest = hashlib.sha256(f"{path}|{size}|{mtime}".encode()).hexdigest()
    name = f"{state.model_name}:latest"
    return {"name": name, "model": name, "modified_at": datetime.fromtimestamp(mtime, UTC).isoformat(),
            "size": size, "digest": digest, "details": _details(engine)}


@router.get("/api/version")
async def version() -> dict[str, str]:
    return {"version": OLLAMA_VERSION}


@router.get("/api/tags")
async def tags(request: Request) -> dict[str, Any]:
    return {"models": [_model_entry(request)]}


@router.get("/api/ps")
async def ps(request: Request) -> dict[str, Any]:
    entry = _model_entry(request)
    return {"models": [entry | {"expires_at": "2318-01-01T00:00:00Z", "size_vram": 0,
                                "context_length": state_of(request).ready_engine().max_model_len}]}


@router.post("/api/show")
async def show(req: ShowRequest, request: Request) -> dict[str, Any]:
    state = state_of(request)
    state.check_model(req.model)
    engine = state.ready_engine()
    cfg = engine.model_config
    info = {"general.architecture": "llama", "general.parameter_count": cfg.num_parameters,
            "llama.context_length": engine.max_model_len, "llama.embedding_length": cfg.hidden_size,
            "llama.block_count": cfg.num_hidden_layers, "llama.feed_forward_length": cfg.intermediate_size,
            "llama.attention.head_count": cfg.num_attention_heads,
            "llama.attention.head_count_kv": cfg.num_key_value_heads, "llama.vocab_size": cfg.vocab_size,
            "llama.rope.freq_base": cfg.rope_theta}
    template = engine.tokenizer.chat_template or ""
    return {"modelfile": f"FROM {state.model_name}\n", "parameters": "", "template": template,
            "details": _details(engine), "model_info": info,
            "capabilities": ["completion", "tools", "embedding"] if template else ["completion", "embedding"],
            "modified_at": _now()}


def _counters(run: ChatRun, totals: Usage, started: float) -> dict[str, Any]:
    """Ollama's closing counters: token counts and durations in nanoseconds."""
    now = time.monotonic()
    ttft = run.stream.ttft
    prompt_ns = int((ttft if ttft is not None else now - started) * 1e9)
    total_ns = int((now - started) * 1e9)
    return {"total_duration": total_ns, "load_duration": 0, "prompt_eval_count": totals.prompt_tokens,
            "prompt_eval_duration": prompt_ns, "eval_count": totals.completion_tokens,
            "eval_duration": max(0, total_ns - prompt_ns)}


def _done_reason(finish_reason: str | None) -> str:
    return "length" if finish_reason == "length" else "stop"


def _ollama_calls(calls: list[Any]) -> list[dict[str, Any]]:
    """Ollama's tool calls (arguments as objects); a call cut short by num_predict is left out (its
    done_reason is "length")."""
    out: list[dict[str, Any]] = []
    for c in calls:
        try:
            arguments = json.loads(c.function.arguments or "{}")
        except json.JSONDecodeError:
            continue
        out.append({"function": {"index": len(out), "name": c.function.name, "arguments": arguments}})
    return out


@router.post("/api/chat", response_model=None, responses=NDJSON_OR_JSON)
async def chat(req: ChatRequest, request: Request) -> dict[str, Any] | StreamingResponse:
    state = state_of(request)
    if not req.messages:  # Ollama's "load the model" request: it is loaded
        state.check_model(req.model)
        state.ready_engine()
        return {"model": state.model_name, "created_at": _now(), "message": {"role": "assistant",
                                                                              "content": ""},
                "done": True, "done_reason": "load"}
    started = time.monotonic()
    sampling, limit = (req.options or Options()).sampling(state.ready_engine().max_model_len)
    run = await start_chat(request, req.to_chat(sampling), limit, default_temperature=0.8)
    rid = new_id("ollama")
    if req.stream:
        return StreamingResponse(_lines(request, run, rid, started, "chat"),
                                 media_type="application/x-ndjson")
    return await _answer(request, run, rid, started, "chat")


@router.post("/api/generate", response_model=None, responses=NDJSON_OR_JSON)
async def generate(req: GenerateRequest, request: Request) -> dict[str, Any] | StreamingResponse:
    state = state_of(request)
    state.check_model(req.model)
    started = time.monotonic()
    engine = state.ready_engine()
    if not req.prompt:  # Ollama's "load the model" request: it is loaded
        return {"model": state.model_name, "created_at": _now(), "response": "", "done": True,
                "done_reason": "load"}
    sampling, limit = (req.options or Options()).sampling(engine.max_model_len)
    rf = req.response_format()
    if req.raw and req.system:
        raise ValueError("'system' cannot be combined with 'raw' (a raw prompt gets no formatting)")
    if req.raw or engine.tokenizer.chat_template is None:
        body: dict[str, Any] = {"model": req.model, "messages": [{"role": "user", "content": req.prompt}],
                                **sampling} | ({"response_format": rf} if rf else {})
        chat_req = chat_request(body)  # validates the sampling fields
        # no template: raw, or a model without one (whose system prompt then goes first, as text)
        ids = await encode_text(engine, (req.system + "\n\n" if req.system else "") + req.prompt)
        run = await start_prompt(request, chat_req, ids, limit, default_temperature=0.8)
    else:
        messages = ([{"role": "system", "content": req.system}] if req.system else []) + [
            {"role": "user", "content": req.prompt}]
        chat_req = chat_request(
            {"model": req.model, "messages": messages, **sampling} | ({"response_format": rf} if rf else {}))
        run = await start_chat(request, chat_req, limit, default_temperature=0.8)
    rid = new_id("ollama")
    if req.stream:
        return StreamingResponse(_lines(request, run, rid, started, "generate"),
                                 media_type="application/x-ndjson")
    return await _answer(request, run, rid, started, "generate")


async def _answer(request: Request, run: ChatRun, rid: str, started: float, kind: str) -> dict[str, Any]:
    """The one JSON object of a non-streamed chat or generate request."""
    state = state_of(request)
    choices = await collect_choices(request, run)
    totals = record(request, state, rid, run.stream)
    c = choices[0] if choices else None
    text, calls = split_calls(c.text if c else "", run.plan)
    head: dict[str, Any] = {"model": state.model_name, "created_at": _now()}
    if kind == "chat":
        message: dict[str, Any] = {"role": "assistant", "content": text or ""}
        if ollama_calls := _ollama_calls(calls or []):
            message["tool_calls"] = ollama_calls
        head["message"] = message
    else:
        head["response"] = c.text if c else ""
    return head | {"done": True, "done_reason": _done_reason(c.finish_reason if c else None),
                   **_counters(run, totals, started)}


def _line(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode() + b"\n"


def _lines(request: Request, run: ChatRun, rid: str, started: float, kind: str) -> AsyncIterator[bytes]:
    """One NDJSON line per delta; tool calls in one line once complete (as Ollama sends them); the last
    line done: true with the counters."""
    state = state_of(request)
    parser = ToolCallParser(run.plan.native) if run.plan else None
    end: dict[str, Any] = {"reason": None}
    calls: list[Any] = []

    def piece(text: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        head = {"model": state.model_name, "created_at": _now()}
        if kind == "chat":
            return head | {"message": {"role": "assistant", "content": text} | (extra or {}), "done": False}
        return head | {"response": text, "done": False}

    async def body() -> AsyncGenerator[bytes, None]:
        async for d in choice_deltas(run.stream, 1):
            text, deltas = parser.feed(d.text) if parser else (d.text, [])
            for delta in deltas:
                if delta.id:
                    calls.append(ToolCall(id=delta.id, function=FunctionCall(name=delta.function.name or "",
                                                                             arguments="")))
                calls[-1].function.arguments += delta.function.arguments or ""
            if text:
                yield _line(piece(text))
            if d.finish_reason is not None:
                end["reason"] = d.finish_reason
        if ollama_calls := _ollama_calls(calls):
            yield _line(piece("", {"tool_calls": ollama_calls}))

    def tail(totals: Usage) -> list[bytes]:
        if end.get("failed"):
            return []
        last = piece("") | {"done": True, "done_reason": _done_reason(end["reason"])}
        return [_line(last | _counters(run, totals, started))]

    def error(e: Exception) -> bytes:
        end["failed"] = True
        return _line({"error": str(e)})

    return framed(request, state, rid, run.stream, body(), error, tail)


@router.post("/api/embed")
async def embed(req: EmbedRequest, request: Request) -> dict[str, Any]:
    state = state_of(request)
    state.check_model(req.model)
    started = time.monotonic()
    inputs = [req.input] if isinstance(req.input, str) else req.input
    engine = state.ready_engine()
    _, num_ctx = Options(num_ctx=req.options.num_ctx if req.options else None).sampling(engine.max_model_len)
    limit = num_ctx or engine.max_model_len
    prompts = [await encode_text(engine, t) for t in inputs]
    for i, p in enumerate(prompts):
        if len(p) > limit and not req.truncate:
            raise ValueError(f"input {i} has {len(p)} tokens, more than the context length ({limit}); send "
                             "truncate: true to cut it to fit")
    try:
        vectors, tokens = await embed_texts(request, [p[:limit] for p in prompts])
    except ClientDisconnected:
        return {}
    ns = int((time.monotonic() - started) * 1e9)
    return {"model": state.model_name, "embeddings": vectors, "total_duration": ns, "load_duration": 0,
            "prompt_eval_count": tokens}

