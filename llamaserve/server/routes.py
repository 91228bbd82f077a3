"""The API routes: /v1/chat/completions, /v1/completions, /v1/models, /predict, /tokenize, /detokenize."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from llamaserve.engine.async_engine import AsyncEngine, RequestStream
from llamaserve.engine.sampling_params import SamplingParams
from llamaserve.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatResponseMessage,
    Completion,
    CompletionChoice,
    CompletionRequest,
    DetokenizeRequest,
    FunctionCall,
    PredictRequest,
    PredictResponse,
    TokenizeRequest,
    ToolCall,
    Usage,
)
from llamaserve.server.serving import (
    SSE_OR_JSON,
    Choice,
    ClientDisconnected,
    chat_logprobs,
    choice_deltas,
    collect,
    completion_logprobs,
    new_id,
    record,
    sse,
    sse_frame,
    unless_disconnected,
)
from llamaserve.server.tools import ToolCallParser, ToolPlan, chat_messages, plan_tools

if TYPE_CHECKING:
    from llamaserve.server.app import AppState

router = APIRouter()


def _state(request: Request) -> AppState:
    return request.app.state.llamaserve  # type: ignore[no-any-return]


state_of = _state  # for the other APIs' routers


# No token of any vocabulary we serve is this long, so a text with more characters than this times the
# context cannot fit: refused before it is tokenized.
MAX_CHARS_PER_TOKEN = 32


def _check_size(engine: AsyncEngine, num_chars: int) -> None:
    limit = engine.max_model_len * MAX_CHARS_PER_TOKEN
    if num_chars > limit:
        raise ValueError(f"the prompt has {num_chars} characters, far more than the context of "
                         f"{engine.max_model_len} tokens can hold (at most {limit} characters are read)")


async def encode_text(engine: AsyncEngine, text: str, add_special_tokens: bool = True) -> list[int]:
    """Tokenize on a worker thread: a long text must not stall the event loop for every other client."""
    _check_size(engine, len(text))
    return await asyncio.to_thread(engine.tokenizer.encode, text, add_special_tokens)


async def _encode_chat(engine: AsyncEngine, messages: list[dict[str, Any]],
                       tools: list[dict[str, Any]] | None = None, continue_final: bool = False) -> list[int]:
    """Render the chat template and tokenize it on a worker thread, after the size check."""
    _check_size(engine, sum(len(str(m.get("content") or "")) for m in messages) + len(str(tools or "")))
    if continue_final and (not messages or messages[-1]["role"] != "assistant"):
        raise ValueError("continue_final_message needs an assistant message last")
    return await asyncio.to_thread(engine.tokenizer.encode_chat, messages, True, tools, continue_final)


async def _start(request: Request, prompts: list[list[int]], params: SamplingParams) -> RequestStream:
    """Admit the request into the engine: every client error and the 429 surface here, before a 200."""
    state = _state(request)
    tenant = getattr(request.state, "tenant", None)  # set by the key check: one prefix cache per key
    if tenant is not None:
        params = dataclasses.replace(params, cache_salt=f"{tenant}|{params.cache_salt or ''}")
    return await state.ready_engine().generate(prompts, params, state.settings.max_queue)


async def _collect(request: Request, stream: RequestStream, n: int, num_prompts: int) -> list[Choice]:
    try:
        return await unless_disconnected(request, collect(stream, n, num_prompts))
    except ClientDisconnected:
        return []


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    state = _state(request)
    return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0,
                                         "owned_by": "llamaserve",
                                         "max_model_len": state.ready_engine().max_model_len}]}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request) -> dict[str, Any]:
    _state(request).check_model(model_id)
    return (await models(request))["data"][0]  # type: ignore[no-any-return]


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, request: Request) -> dict[str, Any]:
    engine = _state(request).ready_engine()
    tok = engine.tokenizer
    if req.messages is not None:
        ids = await _encode_chat(engine, chat_messages(ChatCompletionRequest(messages=req.messages), None,
                                                       tok.chat_template))
    elif req.prompt is not None:
        ids = await encode_text(engine, req.prompt, req.add_special_tokens)
    else:
        raise ValueError("give 'prompt' or 'messages'")
    return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, request: Request) -> dict[str, Any]:
    tok = _state(request).ready_engine().tokenizer
    if any(not 0 <= t < tok.vocab_size for t in req.tokens):
        raise ValueError(f"token ids must be in 0..{tok.vocab_size - 1}")
    return {"prompt": tok.decode(req.tokens, skip_special_tokens=False)}


@router.post("/predict")
async def predict(req: PredictRequest, request: Request) -> PredictResponse:
    text = req.prompt or req.query
    if not text:
        raise ValueError("give a non-empty 'prompt' (or 'query')")
    engine = _state(request).ready_engine()
    if req.raw or engine.tokenizer.chat_template is None:
        ids = await encode_text(engine, text)
    else:
        system = [{"role": "system", "content": req.system}] if req.system else []
        ids = await _encode_chat(engine, system + [{"role": "user", "content": text}])
    stream = await _start(request, [ids], req.sampling_params(req.max_tokens, None, default_temperature=0.0))
    rid = new_id("predict")
    choices = await _collect(request, stream, 1, 1)
    c = choices[0] if choices else Choice(0, finish_reason="abort")
    return PredictResponse(id=rid, response=c.text, finish_reason=c.finish_reason,
                           usage=record(request, _state(request), rid, stream))


@dataclass(slots=True)
class ChatRun:
    """A chat request admitted into the engine: what every API that chats formats its answer from."""

    engine: AsyncEngine
    plan: ToolPlan | None  # the tools offered, and how the model writes calls
    params: SamplingParams
    stream: RequestStream
    prompt_tokens: int


async def start_chat(request: Request, req: ChatCompletionRequest, context_limit: int | None = None,
                     default_temperature: float = 1.0) -> ChatRun:
    """Template, tools, grammar and admission of a chat request (OpenAI's, or one translated into it).

    `context_limit` (Ollama's num_ctx) is a context smaller than the model's for this request: the
    prompt and max_tokens must fit in it (no silent truncation), and max_tokens defaults to what is left.
    """
    _state(request).check_model(req.model)
    return await start_prompt(request, req, await chat_prompt(request, req), context_limit,
                              default_temperature)


async def start_prompt(request: Request, req: ChatCompletionRequest, ids: list[int],
                       context_limit: int | None = None, default_temperature: float = 1.0) -> ChatRun:
    """Admit `ids` (the chat request's prompt, or a raw one) with the request's sampling and tools."""
    engine = _state(request).ready_engine()
    plan = plan_tools(req, engine.tokenizer.chat_template)
    structured = plan.grammar() if plan else req.response_format.structured() if req.response_format else None
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = req.sampling_params(req.max_completion_tokens or req.max_tokens, logprobs, structured,
                                 default_temperature)
    if context_limit is not None:
        params = _within(params, len(ids), context_limit)
    return ChatRun(engine, plan, params, await _start(request, [ids], params), len(ids))


def _within(params: SamplingParams, prompt_tokens: int, limit: int) -> SamplingParams:
    room = limit - prompt_tokens
    if room < 1:
        raise ValueError(f"the prompt has {prompt_tokens} tokens, which a context of {limit} (num_ctx) "
                         "cannot hold with room to generate")
    if params.max_tokens is None:
        return dataclasses.replace(params, max_tokens=room)
    if params.max_tokens > room:
        raise ValueError(f"the prompt has {prompt_tokens} tokens and num_predict is {params.max_tokens}: "
                         f"{prompt_tokens + params.max_tokens} in all, more than num_ctx {limit}")
    return params


async def chat_prompt(request: Request, req: ChatCompletionRequest) -> list[int]:
    """The token ids a chat request's prompt becomes (template, tools and all), without running it."""
    engine = _state(request).ready_engine()
    template = engine.tokenizer.chat_template
    plan = plan_tools(req, template)
    return await _encode_chat(engine, chat_messages(req, plan, template),
                              plan.tools if plan and plan.native else None, req.continue_final_message)


async def collect_choices(request: Request, run: ChatRun) -> list[Choice]:
    """The whole answer of a non-streamed request ([] if the client left first)."""
    return await _collect(request, run.stream, run.params.n, 1)


def split_calls(text: str, plan: ToolPlan | None) -> tuple[str | None, list[ToolCall] | None]:
    """A finished choice's text as (content, tool calls)."""
    if plan is None:
        return text, None
    parser = ToolCallParser(plan.native)
    content, deltas = parser.feed(text)
    if not parser.num_calls:
        return content or None, None  # in calls mode the text is the calls (a call cut short shows nothing)
    calls = [ToolCall(id="", function=FunctionCall(name="", arguments="")) for _ in range(parser.num_calls)]
    for d in deltas:
        call = calls[d.index]
        call.id = d.id or call.id
        call.function.name = d.function.name or call.function.name
        call.function.arguments += d.function.arguments or ""
    return content or None, calls


@router.post("/v1/chat/completions", response_model=None, responses=SSE_OR_JSON)
async def chat(req: ChatCompletionRequest, request: Request) -> ChatCompletion | StreamingResponse:
    state = _state(request)
    run = await start_chat(request, req)
    rid, created = new_id("chatcmpl"), int(time.time())
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_chat_stream(request, run.engine, run.stream, run.params.n, run.plan, rid,
                                              created, include_usage), media_type="text/event-stream")
    choices = await collect_choices(request, run)
    logprobs = run.params.logprobs is not None
    return ChatCompletion(id=rid, created=created, model=state.model_name,
                          choices=[_chat_choice(run.engine, c, run.plan, logprobs) for c in choices],
                          usage=record(request, state, rid, run.stream))


def _chat_choice(engine: AsyncEngine, c: Choice, plan: ToolPlan | None, logprobs: bool) -> ChatChoice:
    content, calls = split_calls(c.text, plan)
    return ChatChoice(index=c.index, message=ChatResponseMessage(content=content, tool_calls=calls),
                      logprobs=chat_logprobs(engine.tokenizer, c.logprobs) if logprobs else None,
                      finish_reason="tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason,
                      stop_reason=c.stop_reason)


def _chat_stream(request: Request, engine: AsyncEngine, stream: RequestStream, n: int, plan: ToolPlan | None,
                 rid: str, created: int, include_usage: bool) -> AsyncIterator[bytes]:
    state = _state(request)
    parsers = {i: ToolCallParser(plan.native) for i in range(n)} if plan else {}

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> bytes:
        return sse(ChatCompletionChunk(id=rid, created=created, model=state.model_name, choices=choices,
                                       usage=usage))

    async def body() -> AsyncGenerator[bytes, None]:
        for i in range(n):
            yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""),
                                         logprobs=None, finish_reason=None)])
        async for d in choice_deltas(stream, n):
            delta = ChatDelta(content=d.text) if d.text else ChatDelta()
            reason = d.finish_reason
            if d.index in parsers:
                content, calls = parsers[d.index].feed(d.text)
                delta = ChatDelta(content=content or None, tool_calls=calls or None)
                if reason == "stop" and parsers[d.index].num_calls:
                    reason = "tool_calls"
                if not (content or calls or reason or d.logprobs):
                    continue  # the calls' JSON around a call: nothing for the client yet
            lp = chat_logprobs(engine.tokenizer, d.logprobs) if d.logprobs else None
            yield chunk([ChatChunkChoice(index=d.index, delta=delta, logprobs=lp, finish_reason=reason)])

    return sse_frame(request, state, rid, stream, body(), (lambda u: chunk([], u)) if include_usage else None)


@router.post("/v1/completions", response_model=None, responses=SSE_OR_JSON)
async def completions(req: CompletionRequest, request: Request) -> Completion | StreamingResponse:
    state = _state(request)
    state.check_model(req.model)
    engine = state.ready_engine()
    prompts = await _completion_prompts(engine, req.prompt, state.settings.max_prompts)
    params = req.sampling_params(req.max_tokens, req.logprobs)
    stream = await _start(request, prompts, params)
    rid, created = new_id("cmpl"), int(time.time())
    echo = [engine.tokenizer.decode(p) if req.echo else "" for p in prompts]
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_completion_stream(request, engine, stream, params.n, echo, rid, created,
                                                    include_usage), media_type="text/event-stream")
    choices = await _collect(request, stream, params.n, len(prompts))
    n = params.n
    return Completion(id=rid, created=created, model=state.model_name, choices=[
        CompletionChoice(index=c.index, text=echo[c.index // n] + c.text, finish_reason=c.finish_reason,
                         stop_reason=c.stop_reason,
                         logprobs=completion_logprobs(engine.tokenizer, c.logprobs, len(echo[c.index // n]))
                         if req.logprobs is not None else None) for c in choices],
        usage=record(request, state, rid, stream))


async def _completion_prompts(engine: AsyncEngine, prompt: Any, max_prompts: int) -> list[list[int]]:
    if isinstance(prompt, str):
        return [await encode_text(engine, prompt)]
    if not prompt:
        raise ValueError("prompt must not be empty")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if len(prompt) > max_prompts:
        raise ValueError(f"the request holds {len(prompt)} prompts; at most {max_prompts} are allowed "
                         "(--max-prompts)")
    if all(isinstance(p, str) for p in prompt):
        _check_size(engine, sum(len(p) for p in prompt))
        return [await encode_text(engine, p) for p in prompt]
    return [list(p) for p in prompt]


def _completion_stream(request: Request, engine: AsyncEngine, stream: RequestStream, n: int,
                       echo: list[str], rid: str, created: int, include_usage: bool) -> AsyncIterator[bytes]:
    state = _state(request)
    offsets: dict[int, int] = {}

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> bytes:
        return sse(Completion(id=rid, created=created, model=state.model_name, choices=choices, usage=usage))

    async def body() -> AsyncGenerator[bytes, None]:
        async for d in choice_deltas(stream, n):
            text = d.text
            if d.index not in offsets:
                text = echo[d.index // n] + text
                offsets[d.index] = 0
            lp = completion_logprobs(engine.tokenizer, d.logprobs, offsets[d.index]) if d.logprobs else None
            offsets[d.index] += len(text)
            yield chunk([CompletionChoice(index=d.index, text=text, logprobs=lp,
                                          finish_reason=d.finish_reason)])

    return sse_frame(request, state, rid, stream, body(), (lambda u: chunk([], u)) if include_usage else None)
