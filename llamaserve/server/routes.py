"""The API routes: /v1/chat/completions, /v1/completions, /v1/models, /predict, /tokenize, /detokenize."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from llamaserve.engine.outputs import TokenLogprob
from llamaserve.server.completions import (
    SSE_DONE,
    Choice,
    ClientDisconnected,
    Run,
    account,
    collect,
    new_id,
    sse,
    sse_error,
    stream_outputs,
)
from llamaserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    PredictRequest,
    TokenizeRequest,
    usage,
)

if TYPE_CHECKING:
    from llamaserve.server.app import AppState


def _messages(req: ChatCompletionRequest | TokenizeRequest) -> list[dict[str, str]]:
    out = []
    for m in req.messages or []:
        role = "system" if m.role == "developer" else m.role
        out.append({"role": role, "content": m.text()} | ({"name": m.name} if m.name else {}))
    return out


def _token_text(tokenizer: Any, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)


def _chat_logprobs(tokenizer: Any, lps: list[TokenLogprob]) -> dict[str, Any]:
    def entry(token: int, lp: float) -> dict[str, Any]:
        text = _token_text(tokenizer, token)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    return {"content": [entry(x.token_id, x.logprob) | {"top_logprobs": [entry(t, v) for t, v in x.top]}
                        for x in lps]}


def _completion_logprobs(tokenizer: Any, lps: list[TokenLogprob], offset: int) -> dict[str, Any]:
    tokens = [_token_text(tokenizer, x.token_id) for x in lps]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [x.logprob for x in lps],
            "top_logprobs": [{_token_text(tokenizer, t): v for t, v in x.top} for x in lps],
            "text_offset": offsets}


def _record(request: Request, state: AppState, rid: str, run: Run) -> None:
    request.state.run_info = {"id": rid, "prompt_tokens": run.prompt_tokens,
                              "completion_tokens": run.completion_tokens,
                              "ttft": None if run.ttft is None else round(run.ttft, 4)}
    state.metrics.observe_request(run.ttft, time.monotonic() - run.started, run.prompt_tokens,
                                  run.completion_tokens)
    if run.completion_tokens:
        per_request = run.completion_tokens / max(1, len(run.prompts))
        state.avg_completion_tokens = 0.9 * state.avg_completion_tokens + 0.1 * per_request


def install(app: FastAPI, state: AppState) -> None:
    def tokenizer() -> Any:
        return state.ready_engine().engine.tokenizer

    def prepare(prompts: list[list[int]], params: Any) -> Run:
        engine = state.ready_engine()
        for p in prompts:  # every client error surfaces here, before a 200 or a stream starts
            engine.engine.check_request(p, params)
        run = Run(prompts, params)
        state.admit(run)  # the run counts as waiting from here until its requests reach the engine
        return run

    async def generate(request: Request, run: Run) -> list[Choice]:
        try:
            return await collect(state.engine, run, request)
        except ClientDisconnected:
            return []

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        engine = state.ready_engine()
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0,
                                             "owned_by": "llamaserve",
                                             "max_model_len": engine.engine.max_model_len}]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        state.check_model(model_id)
        return (await models())["data"][0]

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        tok = tokenizer()
        if req.messages is not None:
            ids = tok.encode_chat(_messages(req))
        elif req.prompt is not None:
            ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            raise ValueError("give 'prompt' or 'messages'")
        return {"tokens": ids, "count": len(ids), "max_model_len": state.ready_engine().engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict[str, Any]:
        tok = tokenizer()
        if any(not 0 <= t < tok.vocab_size for t in req.tokens):
            raise ValueError(f"token ids must be in 0..{tok.vocab_size - 1}")
        return {"prompt": tok.decode(req.tokens, skip_special_tokens=False)}

    @app.post("/predict")
    async def predict(req: PredictRequest, request: Request) -> dict[str, Any]:
        text = req.prompt if req.prompt is not None else req.query
        if not text:
            raise ValueError("give a non-empty 'prompt' (or 'query')")
        tok = tokenizer()
        if req.raw or tok.chat_template is None:
            ids = tok.encode(text)
        else:
            system = [{"role": "system", "content": req.system}] if req.system else []
            ids = tok.encode_chat(system + [{"role": "user", "content": text}])
        run = prepare([ids], req.sampling_params(req.max_tokens, None, default_temperature=0.0))
        rid = new_id("predict")
        choices = await generate(request, run)
        _record(request, state, rid, run)
        c = choices[0] if choices else Choice(0, finish_reason="abort")
        return {"id": rid, "response": c.text, "finish_reason": c.finish_reason,
                "usage": usage(run.prompt_tokens, run.completion_tokens, run.cached_tokens).model_dump()}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(req: ChatCompletionRequest, request: Request) -> Any:
        state.check_model(req.model)
        ids = tokenizer().encode_chat(_messages(req))
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        run = prepare([ids], req.sampling_params(req.max_completion_tokens or req.max_tokens, logprobs))
        rid, created = new_id("chatcmpl"), int(time.time())
        head = {"id": rid, "created": created, "model": state.model_name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_chat_stream(state, request, run, head, include_usage),
                                     media_type="text/event-stream")
        choices = await generate(request, run)
        _record(request, state, rid, run)
        tok = tokenizer()
        return head | {"object": "chat.completion", "choices": [
            {"index": c.index, "message": {"role": "assistant", "content": c.text},
             "logprobs": _chat_logprobs(tok, c.logprobs) if logprobs is not None else None,
             "finish_reason": c.finish_reason, "stop_reason": c.stop_reason} for c in choices],
            "usage": usage(run.prompt_tokens, run.completion_tokens, run.cached_tokens).model_dump()}

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest, request: Request) -> Any:
        state.check_model(req.model)
        if req.suffix:
            raise ValueError("suffix is not supported")
        prompts = _completion_prompts(tokenizer(), req.prompt)
        run = prepare(prompts, req.sampling_params(req.max_tokens, req.logprobs))
        rid, created = new_id("cmpl"), int(time.time())
        head = {"id": rid, "created": created, "model": state.model_name}
        echo = [tokenizer().decode(p) if req.echo else "" for p in prompts]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_completion_stream(state, request, run, head, include_usage, echo),
                                     media_type="text/event-stream")
        choices = await generate(request, run)
        _record(request, state, rid, run)
        tok, n = tokenizer(), run.params.n
        return head | {"object": "text_completion", "choices": [
            {"index": c.index, "text": echo[c.index // n] + c.text, "finish_reason": c.finish_reason,
             "stop_reason": c.stop_reason,
             "logprobs": _completion_logprobs(tok, c.logprobs, len(echo[c.index // n]))
             if req.logprobs is not None else None} for c in choices],
            "usage": usage(run.prompt_tokens, run.completion_tokens, run.cached_tokens).model_dump()}


def _completion_prompts(tok: Any, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        return [tok.encode(prompt)]
    if not prompt:
        raise ValueError("prompt must not be empty")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if all(isinstance(p, str) for p in prompt):
        return [tok.encode(p) for p in prompt]
    return [list(p) for p in prompt]


def _closing_chunks(state: AppState, request: Request, run: Run, base: dict[str, Any],
                    final: dict[int, Any], include_usage: bool) -> list[bytes]:
    """After the last delta: account usage, record metrics and the access log, then usage and [DONE]."""
    account(run, final.values())
    _record(request, state, base["id"], run)
    chunks = []
    if include_usage:
        chunks.append(sse(base | {"choices": [], "usage": usage(
            run.prompt_tokens, run.completion_tokens, run.cached_tokens).model_dump()}))
    return chunks + [SSE_DONE]


async def _chat_stream(state: AppState, request: Request, run: Run, head: dict[str, Any],
                       include_usage: bool) -> AsyncIterator[bytes]:
    base = head | {"object": "chat.completion.chunk"}
    tok = state.engine.engine.tokenizer  # type: ignore[union-attr]
    for i in range(run.params.n):
        yield sse(base | {"choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None}]})
    final = {}
    try:
        async for i, out in stream_outputs(state.engine, run):
            final[i] = out
            for c in out.outputs:
                lp = _chat_logprobs(tok, c.logprobs) if c.logprobs else None
                yield sse(base | {"choices": [{"index": c.index, "delta": {"content": c.text} if c.text
                                               else {}, "logprobs": lp, "finish_reason": c.finish_reason}]})
    except (ValueError, RuntimeError) as e:  # reported in-band: the 200 header has gone out already
        yield sse_error(e)
    for chunk in _closing_chunks(state, request, run, base, final, include_usage):
        yield chunk


async def _completion_stream(state: AppState, request: Request, run: Run, head: dict[str, Any],
                             include_usage: bool, echo: list[str]) -> AsyncIterator[bytes]:
    base = head | {"object": "text_completion"}
    tok, n = state.engine.engine.tokenizer, run.params.n  # type: ignore[union-attr]
    offsets = {}
    final = {}
    try:
        async for i, out in stream_outputs(state.engine, run):
            final[i] = out
            for c in out.outputs:
                index = i * n + c.index
                text = c.text
                if index not in offsets:
                    text = echo[i] + text
                    offsets[index] = 0
                lp = _completion_logprobs(tok, c.logprobs, offsets[index]) if c.logprobs else None
                offsets[index] += len(text)
                yield sse(base | {"choices": [{"index": index, "text": text, "logprobs": lp,
                                               "finish_reason": c.finish_reason}]})
    except (ValueError, RuntimeError) as e:  # reported in-band: the 200 header has gone out already
        yield sse_error(e)
    for chunk in _closing_chunks(state, request, run, base, final, include_usage):
        yield chunk
