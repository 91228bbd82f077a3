"""The API routes against a fake engine: formatting, streaming, errors, admission and disconnects.

No model is loaded. FakeEngine has AsyncEngine's public surface; its `generate` returns a genuine
RequestStream whose queue a task fills with scripted (prompt index, RequestOutput) items.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from starlette.testclient import TestClient

from llamaserve.engine.async_engine import EngineDeadError, EngineStats, QueueFull, RequestStream
from llamaserve.engine.outputs import CompletionOutput, RequestOutput
from llamaserve.engine.sampling_params import SamplingParams
from llamaserve.server.app import create_app
from llamaserve.server.settings import ServerSettings
from llamaserve.server.tools import ToolPlan

MODEL = "fake-model"
TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"  # knows no tools: the generic format
NATIVE_TEMPLATE = "{% if tools %}{{ tools }}{% endif %}" + TEMPLATE


class FakeTokenizer:
    """One token per character (code point mod 1000 is enough for these tests' ASCII)."""

    vocab_size = 1000
    eos_token_ids = [0]

    def __init__(self, chat_template: str | None) -> None:
        self.chat_template = chat_template
        self.chats: list[tuple[list[dict], Any]] = []  # what encode_chat was given

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(ch) for ch in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None, continue_final: bool = False) -> list[int]:
        self.chats.append((messages, tools))
        self.continued = continue_final
        return self.encode("".join(str(m.get("content") or "") for m in messages) or "x")


Script = Callable[[list[list[int]], SamplingParams, list[str]], list[tuple[int, RequestOutput]]]


@dataclass
class Call:
    prompts: list[list[int]]
    params: SamplingParams
    max_queue: int | None


@dataclass
class FakeEngine:
    """AsyncEngine's public surface; `script` gives each request's outputs, `fail` makes generate raise."""

    script: Script | None = None
    fail: BaseException | None = None
    hang_after: int | None = None  # deliver this many items, then never finish
    tokenizer: FakeTokenizer = field(default_factory=lambda: FakeTokenizer(TEMPLATE))
    max_model_len: int = 4096
    kv_cache: dict = field(default_factory=lambda: {"num_blocks": 64})
    healthy: bool = True
    error: str | None = None
    stats: EngineStats = field(default_factory=lambda: EngineStats(0, 0, 0, 0.0, 0, 0, 0.0))
    calls: list[Call] = field(default_factory=list)
    streams: list[RequestStream] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)  # engine request ids closed before they finished
    abort_times: list[float] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    _tasks: list[asyncio.Task] = field(default_factory=list)

    async def generate(self, prompts: list[list[int]], params: SamplingParams,
                       max_queue: int | None = None) -> RequestStream:
        self.calls.append(Call(prompts, params, max_queue))
        if self.fail is not None:
            raise self.fail
        ids = [f"req{len(self.calls)}-{i}" for i in range(len(prompts))]
        stream = RequestStream(self, ids, asyncio.Queue())  # type: ignore[arg-type]
        self.streams.append(stream)
        items = (self.script or script_texts({}))(prompts, params, ids)
        if self.hang_after is not None:
            items = items[:self.hang_after]
        self._tasks.append(asyncio.get_running_loop().create_task(self._feed(stream.queue, items)))
        return stream

    @staticmethod
    async def _feed(queue: asyncio.Queue, items: list[tuple[int, Any]]) -> None:
        for item in items:
            await asyncio.sleep(0)  # one engine step per loop turn
            queue.put_nowait(item)

    # What RequestStream calls back.
    def _close(self, ids: list[str], unfinished: set[int]) -> None:
        if unfinished:
            self.aborted += [ids[i] for i in sorted(unfinished)]
            self.abort_times.append(time.monotonic())
        unfinished.clear()

    def _finished(self, out: RequestOutput) -> None:
        self.finished.append(out.request_id)


def script_texts(pieces: dict[tuple[int, int], list[str]], reasons: dict[tuple[int, int], str] | None = None,
                 cached: int = 0, error: str | None = None) -> Script:
    """Outputs for pieces[(prompt, choice)] (text deltas), prompts interleaved step by step.

    Each piece is one token; a choice finishes with its last piece (reason "stop" unless `reasons` says);
    prompt_tokens is the prompt's length, cached_tokens `cached` per prompt; `error` ends every prompt
    with an engine failure instead.
    """
    def script(prompts: list[list[int]], params: SamplingParams, ids: list[str]) -> list[tuple[int, Any]]:
        items: list[tuple[int, RequestOutput]] = []
        steps = max((len(v) for v in pieces.values()), default=1)
        done = {i: 0 for i in range(len(prompts))}
        for s in range(steps):
            for i in range(len(prompts)):
                outs = []
                for c in range(params.n):
                    texts = pieces.get((i, c), [""])
                    if s < len(texts):
                        last = s == len(texts) - 1
                        outs.append(CompletionOutput(c, texts[s], [100 + s], None,
                                                     (reasons or {}).get((i, c), "stop") if last else None))
                        done[i] += 1
                finished = s == steps - 1
                n_prompt = len(prompts[i])
                if error is not None and finished:
                    items.append((i, RequestOutput(ids[i], [], n_prompt, done[i], cached, True, error)))
                elif outs or finished:
                    items.append((i, RequestOutput(ids[i], outs, n_prompt, done[i], cached, finished)))
        return items
    return script


def make(engine: FakeEngine | None = None, **settings: Any) -> tuple[TestClient, FakeEngine]:
    engine = engine or FakeEngine()
    app = create_app(engine, ServerSettings(log_requests=False, **settings), MODEL)  # type: ignore[arg-type]
    return TestClient(app), engine


def events(body: str) -> list[Any]:
    """The SSE stream's payloads, [DONE] as the string."""
    out = []
    for block in body.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block.removeprefix("data: ")
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}


# -- non-streamed formatting ----------------------------------------------------------------------


def test_chat_joins_the_deltas_and_reports_the_streams_usage() -> None:
    client, engine = make(FakeEngine(script=script_texts({(0, 0): ["Hel", "lo", " there", "!"]}, cached=3)))
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    assert body["id"].startswith("chatcmpl-") and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop"
    assert choice["message"] == {"role": "assistant", "content": "Hello there!", "tool_calls": None}
    prompt_len = len(engine.calls[0].prompts[0])
    assert body["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": 4,
                             "total_tokens": prompt_len + 4, "prompt_tokens_details": {"cached_tokens": 3}}
    assert engine.aborted == [] and engine.finished == ["req1-0"]  # finished, not aborted


def test_chat_n2_gives_each_choice_its_text_and_finish_reason() -> None:
    script = script_texts({(0, 0): ["a", "b"], (0, 1): ["x", "y", "z"]}, reasons={(0, 1): "length"})
    client, engine = make(FakeEngine(script=script))
    r = client.post("/v1/chat/completions", json=CHAT | {"n": 2, "max_completion_tokens": 3})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in choices] == [
        (0, "ab", "stop"), (1, "xyz", "length")]
    assert r.json()["usage"]["completion_tokens"] == 5
    params = engine.calls[0].params
    assert params.n == 2 and params.max_tokens == 3


def test_completions_map_prompts_and_choices_to_index_prompt_times_n_plus_choice() -> None:
    pieces = {(i, c): [f"p{i}", f"c{c}", "."] for i in range(3) for c in range(2)}
    pieces[(2, 1)] = ["only"]
    client, engine = make(FakeEngine(script=script_texts(pieces, reasons={(1, 0): "length"}, cached=1)))
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": ["ab", "cde", "f"], "n": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == MODEL
    got = [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]]
    assert got == [(0, "p0c0.", "stop"), (1, "p0c1.", "stop"), (2, "p1c0.", "length"), (3, "p1c1.", "stop"),
                   (4, "p2c0.", "stop"), (5, "only", "stop")]
    assert engine.calls[0].prompts == [[97, 98], [99, 100, 101], [102]]
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 16, "total_tokens": 22,
                             "prompt_tokens_details": {"cached_tokens": 3}}
    assert sorted(engine.finished) == ["req1-0", "req1-1", "req1-2"] and engine.aborted == []


def test_completions_echo_and_token_prompts() -> None:
    client, engine = make(FakeEngine(script=script_texts({(0, 0): [" world"], (1, 0): ["!"]})))
    r = client.post("/v1/completions", json={"prompt": [[104, 105], [111]], "echo": True})
    assert r.status_code == 200, r.text
    assert [c["text"] for c in r.json()["choices"]] == ["hi world", "o!"]
    assert engine.calls[0].prompts == [[104, 105], [111]]
    assert engine.calls[0].params.max_tokens == 16  # the completions API's default


# -- streaming ------------------------------------------------------------------------------------


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_stream_role_first_one_chunk_per_delta_then_done(include_usage: bool) -> None:
    pieces = ["Hel", "lo", "", "!"]  # an empty delta (a token that is not text yet) is still a chunk
    client, engine = make(FakeEngine(script=script_texts({(0, 0): pieces}, cached=2)))
    body = CHAT | {"stream": True} | ({"stream_options": {"include_usage": True}} if include_usage else {})
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    evs = events(r.text)
    assert evs[-1] == "[DONE]"
    chunks = evs[:-1]
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert chunks[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None}]
    deltas = chunks[1:1 + len(pieces)]
    assert [c["choices"][0]["delta"] for c in deltas] == [{"content": "Hel"}, {"content": "lo"}, {},
                                                          {"content": "!"}]
    assert [c["choices"][0]["finish_reason"] for c in deltas] == [None, None, None, "stop"]
    rest = chunks[1 + len(pieces):]
    prompt_len = len(engine.calls[0].prompts[0])
    if include_usage:
        assert len(rest) == 1 and rest[0]["choices"] == []
        assert rest[0]["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": 4,
                                    "total_tokens": prompt_len + 4,
                                    "prompt_tokens_details": {"cached_tokens": 2}}
    else:
        assert rest == []
    assert all("usage" not in c for c in chunks[:1 + len(pieces)])
    assert engine.aborted == []


def test_chat_stream_n2_starts_every_choice_with_its_role() -> None:
    client, _ = make(FakeEngine(script=script_texts({(0, 0): ["a", "b"], (0, 1): ["c"]})))
    r = client.post("/v1/chat/completions", json=CHAT | {"stream": True, "n": 2})
    chunks = events(r.text)[:-1]
    assert [(c["choices"][0]["index"], c["choices"][0]["delta"]) for c in chunks[:2]] == [
        (0, {"role": "assistant", "content": ""}), (1, {"role": "assistant", "content": ""})]
    text = {0: "", 1: ""}
    finish = {}
    for c in chunks[2:]:
        (ch,) = c["choices"]
        text[ch["index"]] += ch["delta"].get("content", "")
        if ch["finish_reason"]:
            finish[ch["index"]] = ch["finish_reason"]
    assert text == {0: "ab", 1: "c"} and finish == {0: "stop", 1: "stop"}


def test_completions_stream_indices_echo_and_usage() -> None:
    client, _ = make(FakeEngine(script=script_texts({(0, 0): ["1", "2"], (1, 0): ["3"], (1, 1): ["4", "5"]})))
    r = client.post("/v1/completions", json={"prompt": ["ab", "c"], "n": 2, "echo": True, "stream": True,
                                             "stream_options": {"include_usage": True}})
    evs = events(r.text)
    assert evs[-1] == "[DONE]"
    chunks = evs[:-1]
    text: dict[int, str] = {}
    for c in chunks[:-1]:
        assert c["object"] == "text_completion" and "usage" not in c
        (ch,) = c["choices"]
        text[ch["index"]] = text.get(ch["index"], "") + ch["text"]
    assert text == {0: "ab12", 1: "ab", 2: "c3", 3: "c45"}  # choice 1 of prompt 0: the echo, no tokens
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert chunks[-1]["usage"]["prompt_tokens"] == 3


def test_engine_failure_mid_stream_is_reported_in_band() -> None:
    client, _ = make(FakeEngine(script=script_texts({(0, 0): ["a", "b"]}, error="engine failure: boom")))
    r = client.post("/v1/chat/completions", json=CHAT | {"stream": True})
    assert r.status_code == 200
    evs = events(r.text)
    assert evs[-1] == "[DONE]"
    assert evs[-2] == {"error": {"message": "engine failure: boom", "type": "service_unavailable",
                                 "param": None, "code": "engine_failed"}}


@pytest.mark.parametrize("error,status,kind", [
    (ValueError("request id in use"), 400, "invalid_request_error"),  # add_request refused it
    (EngineDeadError("engine failure: step"), 503, "service_unavailable"),  # _fail_pending
])
def test_an_exception_delivered_through_the_stream(error: Exception, status: int, kind: str) -> None:
    def script(prompts: list[list[int]], params: SamplingParams, ids: list[str]) -> list[tuple[int, Any]]:
        return [(0, RequestOutput(ids[0], [CompletionOutput(0, "a", [1], None, None)], 1, 1, 0, False)),
                (0, error)]

    client, engine = make(FakeEngine(script=script))
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == status and r.json()["error"]["type"] == kind
    assert r.json()["error"]["message"] == str(error)
    evs = events(client.post("/v1/chat/completions", json=CHAT | {"stream": True}).text)
    assert evs[-1] == "[DONE]" and evs[-2]["error"]["type"] == kind
    assert [c["choices"][0]["delta"] for c in evs[1:-2]] == [{"content": "a"}]
    assert engine.aborted == ["req1-0", "req2-0"]  # the stream closed what had not finished


def test_engine_failure_before_a_non_streamed_answer_is_503() -> None:
    client, _ = make(FakeEngine(script=script_texts({(0, 0): ["a"]}, error="engine failure: boom")))
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "engine_failed" and "boom" in r.json()["error"]["message"]


# -- admission and errors -------------------------------------------------------------------------


def rejected(client: TestClient) -> float:
    text = client.get("/metrics").text
    match = re.search(r"^llamaserve_requests_rejected_queue_full_total (\S+)$", text, re.M)
    assert match, text
    return float(match.group(1))


@pytest.mark.parametrize("stream", [False, True])
def test_queue_full_is_429_with_retry_after_and_counted(stream: bool) -> None:
    client, engine = make(FakeEngine(fail=QueueFull(12, 8, 7)), max_queue=8)
    assert rejected(client) == 0
    for k in (1, 2):
        r = client.post("/v1/chat/completions", json=CHAT | {"stream": stream})
        assert r.status_code == 429, r.text  # before any 200, streamed or not
        assert r.headers["retry-after"] == "7"
        err = r.json()["error"]
        assert err["type"] == "rate_limit_error" and err["code"] == "queue_full"
        assert "12 sequences" in err["message"] and "--max-queue 8" in err["message"]
        assert rejected(client) == k
    r = client.post("/v1/completions", json={"prompt": "x"})
    assert r.status_code == 429 and rejected(client) == 3


@pytest.mark.parametrize("path,body", [("/v1/chat/completions", CHAT), ("/v1/completions", {"prompt": "x"}),
                                       ("/predict", {"prompt": "x"})])
def test_a_value_error_from_the_engine_is_400_in_openais_shape(path: str, body: dict) -> None:
    client, _ = make(FakeEngine(fail=ValueError("the prompt has 9000 tokens")))
    r = client.post(path, json=body)
    assert r.status_code == 400
    assert r.json() == {"error": {"message": "the prompt has 9000 tokens", "type": "invalid_request_error",
                                  "param": None, "code": None}}


def test_a_dead_engine_is_503() -> None:
    client, _ = make(FakeEngine(fail=EngineDeadError("engine failure: CUDA error")))
    r = client.post("/v1/chat/completions", json=CHAT | {"stream": True})
    assert r.status_code == 503
    assert r.json()["error"] == {"message": "engine failure: CUDA error", "type": "service_unavailable",
                                 "param": None, "code": "engine_failed"}


def test_an_unhealthy_engine_is_503_before_generate() -> None:
    client, engine = make(FakeEngine(healthy=False, error="engine failure: x"))
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_failed"
    assert engine.calls == []


@pytest.mark.parametrize("max_queue", [0, 5, 321])
def test_generate_gets_the_servers_max_queue(max_queue: int) -> None:
    client, engine = make(max_queue=max_queue)
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert client.post("/v1/completions", json={"prompt": "x", "stream": True}).status_code == 200
    assert client.post("/predict", json={"prompt": "x"}).status_code == 200
    assert [c.max_queue for c in engine.calls] == [max_queue] * 3


def test_a_wrong_model_is_404_and_reaches_no_engine() -> None:
    client, engine = make()
    r = client.post("/v1/chat/completions", json=CHAT | {"model": "gpt-4"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert engine.calls == []


# -- request validation ---------------------------------------------------------------------------


@pytest.mark.parametrize("path,body", [("/v1/chat/completions", CHAT), ("/v1/completions", {"prompt": "x"})])
def test_an_unknown_field_is_400_naming_it(path: str, body: dict) -> None:
    client, engine = make()
    r = client.post(path, json=body | {"frobnicate": 1})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == "frobnicate"
    assert "frobnicate" in err["message"]
    assert engine.calls == []


@pytest.mark.parametrize("extra,name", [({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
                                        ({"store": True}, "store"), ({"modalities": ["text", "audio"]},
                                                                     "modalities"),
                                        ({"service_tier": "flex"}, "service_tier")])
def test_an_unsupported_openai_field_is_400_naming_it(extra: dict, name: str) -> None:
    client, engine = make()
    r = client.post("/v1/chat/completions", json=CHAT | extra)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and f"'{name}'" in err["message"]
    assert engine.calls == []


@pytest.mark.parametrize("extra", [{"store": False}, {"modalities": ["text"]}, {"service_tier": "auto"},
                                   {"metadata": {"k": "v"}}, {"user": "u1"}])
def test_a_harmless_openai_field_is_accepted(extra: dict) -> None:
    client, engine = make()
    assert client.post("/v1/chat/completions", json=CHAT | extra).status_code == 200
    assert len(engine.calls) == 1


# -- tool calls -----------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL_TEXT = '{"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris"}}]}'
NATIVE_CALL_TEXT = '{"name":"get_weather","parameters":{"city":"Paris"}}'


def split(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


SPLITS = [[], [1], [5, 19, 20, 33, 34, 38, 45, 46, 60], list(range(1, len(CALL_TEXT)))]
TOOLS_REQ = CHAT | {"tools": [WEATHER], "tool_choice": "required"}


@pytest.mark.parametrize("cuts", SPLITS, ids=["whole", "1+rest", "pieces", "chars"])
def test_non_streamed_tool_call(cuts: list[int]) -> None:
    client, engine = make(FakeEngine(script=script_texts({(0, 0): split(CALL_TEXT, cuts)})))
    r = client.post("/v1/chat/completions", json=TOOLS_REQ)
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None
    (call,) = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    # The routes asked the engine for the plan's grammar and prompted with the tools (generic format).
    plan = ToolPlan([WEATHER], "required", True, False)
    assert engine.calls[0].params.structured == plan.grammar()
    messages, tools = engine.tokenizer.chats[-1]
    assert tools is None and messages[0] == {"role": "system", "content": plan.system_prompt()}


@pytest.mark.parametrize("cuts", SPLITS, ids=["whole", "1+rest", "pieces", "chars"])
def test_streamed_tool_call(cuts: list[int]) -> None:
    client, _ = make(FakeEngine(script=script_texts({(0, 0): split(CALL_TEXT, cuts)})))
    r = client.post("/v1/chat/completions", json=TOOLS_REQ | {"stream": True})
    evs = events(r.text)
    assert evs[-1] == "[DONE]"
    chunks = [c["choices"][0] for c in evs[1:-1]]
    assert evs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    calls = [d for c in chunks for d in c["delta"].get("tool_calls", [])]
    assert all("content" not in c["delta"] for c in chunks)
    assert calls and all(d["index"] == 0 for d in calls)
    first, rest = calls[0], calls[1:]
    assert first["id"].startswith("call_") and first["type"] == "function"
    assert first["function"]["name"] == "get_weather"
    assert all("id" not in d and "name" not in d["function"] for d in rest)
    arguments = "".join(d["function"].get("arguments", "") for d in calls)
    assert json.loads(arguments) == {"city": "Paris"}
    assert [c["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["tool_calls"]


def test_native_tool_call_streamed_and_not() -> None:
    pieces = split(NATIVE_CALL_TEXT, [3, 9, 30, 31, 40])
    engine = FakeEngine(script=script_texts({(0, 0): pieces}), tokenizer=FakeTokenizer(NATIVE_TEMPLATE))
    client, _ = make(engine)
    r = client.post("/v1/chat/completions", json=TOOLS_REQ)
    (call,) = r.json()["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    messages, tools = engine.tokenizer.chats[-1]
    assert tools == [WEATHER] and messages == [{"role": "user", "content": "Hi"}]  # the template renders them
    evs = events(client.post("/v1/chat/completions", json=TOOLS_REQ | {"stream": True}).text)
    deltas = [d for c in evs[1:-1] for d in c["choices"][0]["delta"].get("tool_calls", [])]
    assert deltas[0]["function"]["name"] == "get_weather"
    assert json.loads("".join(d["function"].get("arguments", "") for d in deltas)) == {"city": "Paris"}
    assert evs[-2]["choices"][0]["finish_reason"] == "tool_calls"


def test_auto_tool_choice_plain_text_is_content() -> None:
    client, _ = make(FakeEngine(script=script_texts({(0, 0): ["It is ", "sunny {really}."]})))
    r = client.post("/v1/chat/completions", json=CHAT | {"tools": [WEATHER]})
    (choice,) = r.json()["choices"]
    assert choice["message"] == {"role": "assistant", "content": "It is sunny {really}.", "tool_calls": None}
    assert choice["finish_reason"] == "stop"
    evs = events(client.post("/v1/chat/completions", json=CHAT | {"tools": [WEATHER], "stream": True}).text)
    assert [c["choices"][0]["delta"] for c in evs[1:-1]] == [{"content": "It is "},
                                                             {"content": "sunny {really}."}]


def test_tool_call_cut_at_max_tokens_keeps_length() -> None:
    script = script_texts({(0, 0): split(CALL_TEXT, [40])}, reasons={(0, 0): "length"})
    client, _ = make(FakeEngine(script=script))
    (choice,) = client.post("/v1/chat/completions", json=TOOLS_REQ).json()["choices"]
    assert choice["finish_reason"] == "length"


def test_call_cut_before_its_name_shows_the_same_nothing_streamed_or_not() -> None:
    script = script_texts({(0, 0): ['{"tool_calls":[{"na']}, reasons={(0, 0): "length"})
    client, _ = make(FakeEngine(script=script))
    (choice,) = client.post("/v1/chat/completions", json=TOOLS_REQ).json()["choices"]
    assert choice["message"]["content"] is None and choice["message"]["tool_calls"] is None
    assert choice["finish_reason"] == "length"
    client, _ = make(FakeEngine(script=script))
    evs = events(client.post("/v1/chat/completions", json=TOOLS_REQ | {"stream": True}).text)
    assert all("content" not in c["choices"][0]["delta"] and "tool_calls" not in c["choices"][0]["delta"]
               for c in evs[1:-1])
    assert evs[-2]["choices"][0]["finish_reason"] == "length"


def test_bad_tool_requests_are_400() -> None:
    client, engine = make()
    for extra in ({"tool_choice": "required"},  # no tools
                  {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                  {"tools": [WEATHER, WEATHER]},
                  {"tools": [WEATHER], "response_format": {"type": "json_object"}}):
        r = client.post("/v1/chat/completions", json=CHAT | extra)
        assert r.status_code == 400, (extra, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"
    assert engine.calls == []


# -- client disconnects ---------------------------------------------------------------------------


async def call_asgi(app: Any, path: str, body: dict, disconnect_after: float,
                    spec_version: str = "2.3") -> tuple[list[dict], float]:
    """Run one request on the ASGI app directly; the client leaves `disconnect_after` s after its body."""
    data = json.dumps(body).encode()
    sent: list[dict] = []
    state = {"body_sent": False, "left_at": 0.0}

    async def receive() -> dict:
        if not state["body_sent"]:
            state["body_sent"] = True
            return {"type": "http.request", "body": data, "more_body": False}
        if not state["left_at"]:
            await asyncio.sleep(disconnect_after)
            state["left_at"] = time.monotonic()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 5000), "server": ("testserver", 80),
             "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(data)).encode())]}
    await asyncio.wait_for(app(scope, receive, send), timeout=5)
    return sent, state["left_at"]


@pytest.mark.parametrize("path,body", [("/v1/chat/completions", CHAT), ("/v1/completions", {"prompt": "ab"}),
                                       ("/predict", {"prompt": "ab"})])
def test_disconnect_during_a_non_streamed_request_aborts_it(path: str, body: dict) -> None:
    engine = FakeEngine(script=script_texts({(0, 0): ["a", "b", "c"]}), hang_after=1)  # never finishes
    app = create_app(engine, ServerSettings(log_requests=False), MODEL)  # type: ignore[arg-type]
    start = time.monotonic()
    sent, left_at = asyncio.run(call_asgi(app, path, body, disconnect_after=0.3))
    assert time.monotonic() - start < 2.0
    assert left_at and engine.aborted == ["req1-0"]
    assert engine.abort_times[0] >= left_at  # aborted because the client left, not before
    assert engine.finished == []
    assert sent and sent[-1].get("more_body", False) is False  # the app ended its response


@pytest.mark.parametrize("path,body", [("/v1/chat/completions", CHAT | {"stream": True}),
                                       ("/v1/completions", {"prompt": "ab", "stream": True})])
def test_disconnect_during_a_stream_aborts_it(path: str, body: dict) -> None:
    engine = FakeEngine(script=script_texts({(0, 0): ["a", "b", "c"]}), hang_after=2)
    app = create_app(engine, ServerSettings(log_requests=False), MODEL)  # type: ignore[arg-type]
    start = time.monotonic()
    sent, left_at = asyncio.run(call_asgi(app, path, body, disconnect_after=0.3))
    assert time.monotonic() - start < 2.0
    assert left_at and engine.aborted == ["req1-0"]
    assert engine.abort_times[0] >= left_at
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    chunks = b"".join(m.get("body", b"") for m in sent[1:])
    assert b'"a"' in chunks and b"[DONE]" not in chunks  # what came before the client left, no more
    # the request is still accounted for: one end-to-end observation in the metrics
    samples = app.state.llamaserve.metrics.e2e.collect()[0].samples
    assert [x.value for x in samples if x.name.endswith("_count")] == [1]


def test_a_finished_request_is_not_aborted_by_a_later_disconnect() -> None:
    engine = FakeEngine(script=script_texts({(0, 0): ["a", "b"]}))
    app = create_app(engine, ServerSettings(log_requests=False), MODEL)  # type: ignore[arg-type]
    sent, _ = asyncio.run(call_asgi(app, "/v1/chat/completions", CHAT, disconnect_after=0.05))
    assert engine.aborted == [] and engine.finished == ["req1-0"]
    body = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
    assert body["choices"][0]["message"]["content"] == "ab"
