"""The other APIs (Anthropic Messages, OpenAI Responses, Ollama, embeddings, vLLM metric names) against
a fake engine: how each request becomes a chat, each stream's event order, each route's error shape,
429s with Retry-After in that shape. No model is loaded."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llamaserve.engine.async_engine import QueueFull
from tests.server.test_routes import MODEL, NATIVE_TEMPLATE, FakeEngine, FakeTokenizer, make, script_texts

KEY = {"Authorization": "Bearer k"}


def sse(body: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, payload) of each server-sent event."""
    out = []
    for block in body.split("\n\n"):
        if not block.strip():
            continue
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        payload = json.loads(lines["data"])
        assert payload["type"] == lines["event"]  # every payload carries its type, as the event says
        out.append((lines["event"], payload))
    return out


# -- Anthropic ------------------------------------------------------------------------------------
MESSAGES = {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "Hi"}]}


def test_messages_maps_system_blocks_and_sampling_onto_the_chat() -> None:
    client, engine = make(FakeEngine(script=script_texts({(0, 0): ["Hel", "lo"]}, cached=2)))
    body = MESSAGES | {"system": [{"type": "text", "text": "Be brief."}], "temperature": 0.5, "top_k": 5,
                       "stop_sequences": ["END"], "messages": [{"role": "user", "content": [
                           {"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]}
    r = client.post("/v1/messages", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["type"] == "message" and out["role"] == "assistant" and out["id"].startswith("msg_")
    assert out["content"] == [{"type": "text", "text": "Hello"}]
    assert out["stop_reason"] == "end_turn" and out["stop_sequence"] is None
    prompt = len(engine.calls[0].prompts[0])
    assert out["usage"] == {"input_tokens": prompt - 2, "output_tokens": 2, "cache_read_input_tokens": 2,
                            "cache_creation_input_tokens": 0}
    messages, _ = engine.tokenizer.chats[0]
    assert messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi \nthere"}]
    p = engine.calls[0].params
    assert (p.max_tokens, p.temperature, p.top_k, p.stop) == (16, 0.5, 5, ["END"])


@pytest.mark.parametrize("reason,stop_reason,expected", [("length", None, ("max_tokens", None)),
                                                         ("stop", "END", ("stop_sequence", "END"))])
def test_messages_stop_reasons(reason: str, stop_reason: str | None, expected: tuple) -> None:
    def script(prompts: Any, params: Any, ids: list[str]) -> list:
        from llamaserve.engine.outputs import CompletionOutput, RequestOutput
        return [(0, RequestOutput(ids[0], [CompletionOutput(0, "x", [5], None, reason, stop_reason)], 3, 1,
                                  0, True))]

    client, _ = make(FakeEngine(script=script))
    out = client.post("/v1/messages", json=MESSAGES).json()
    assert (out["stop_reason"], out["stop_sequence"]) == expected


def test_messages_tool_use_and_tool_result_history_become_calls_and_tool_messages() -> None:
    client, engine = make()
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": [{"type": "text", "text": "Let me look."},
                                                 {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                  "input": {"city": "Paris"}}]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                             "content": [{"type": "text", "text": "18C"}]}]}]
    tools = [{"name": "get_weather", "description": "Weather", "input_schema": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
    r = client.post("/v1/messages", json=MESSAGES | {"messages": history, "tools": tools})
    assert r.status_code == 200, r.text
    messages, _ = engine.tokenizer.chats[0]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]  # generic tool format
    assert '"city": "Paris"' in messages[2]["content"] and "Function result (get_weather): 18C" in \
        messages[3]["content"]


def test_messages_streams_anthropics_event_sequence() -> None:
    client, _ = make(FakeEngine(script=script_texts({(0, 0): ["Hel", "lo"]})))
    r = client.post("/v1/messages", json=MESSAGES | {"stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    evs = sse(r.text)
    assert [e for e, _ in evs] == ["message_start", "content_block_start", "content_block_delta",
                                   "content_block_delta", "content_block_stop", "message_delta",
                                   "message_stop"]
    assert evs[0][1]["message"]["content"] == [] and evs[0][1]["message"]["usage"]["output_tokens"] == 0
    assert evs[1][1] == {"type": "content_block_start", "index": 0,
                         "content_block": {"type": "text", "text": ""}}
    assert "".join(p["delta"]["text"] for e, p in evs if e == "content_block_delta") == "Hello"
    assert evs[5][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert evs[5][1]["usage"]["output_tokens"] == 2


def test_messages_stream_of_a_tool_call_has_a_tool_use_block_with_input_json_deltas() -> None:
    call = '{"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris"}}]}'
    client, _ = make(FakeEngine(script=script_texts({(0, 0): [call[:30], call[30:50], call[50:]]})))
    tools = [{"name": "get_weather", "input_schema": {"type": "object", "properties": {
        "city": {"type": "string"}}}}]
    r = client.post("/v1/messages", json=MESSAGES | {"stream": True, "tools": tools,
                                                     "tool_choice": {"type": "any"}})
    evs = sse(r.text)
    starts = [p["content_block"] for e, p in evs if e == "content_block_start"]
    assert len(starts) == 1 and starts[0]["type"] == "tool_use" and starts[0]["name"] == "get_weather"
    assert starts[0]["id"].startswith("toolu_") and starts[0]["input"] == {}
    partial = "".join(p["delta"]["partial_json"] for e, p in evs if e == "content_block_delta")
    assert json.loads(partial) == {"city": "Paris"}
    assert [p for e, p in evs if e == "message_delta"][0]["delta"]["stop_reason"] == "tool_use"


def test_messages_errors_are_in_anthropics_shape() -> None:
    client, _ = make(api_keys=("k",))
    r = client.post("/v1/messages", json={k: v for k, v in MESSAGES.items() if k != "max_tokens"},
                    headers={"x-api-key": "k"})
    assert r.status_code == 400
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in r.json()["error"]["message"]
    r = client.post("/v1/messages", json=MESSAGES, headers={"x-api-key": "wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = client.post("/v1/messages", json=MESSAGES | {"model": "claude-9"}, headers={"x-api-key": "k"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = client.post("/v1/messages", content=b"x", headers={"x-api-key": "k", "content-type": "text/plain"})
    assert r.status_code == 415 and r.json()["type"] == "error"


def test_a_full_queue_is_a_429_with_retry_after_in_each_routes_shape() -> None:
    client, _ = make(FakeEngine(fail=QueueFull(9, 8, 7)))
    r = client.post("/v1/messages", json=MESSAGES)
    assert r.status_code == 429 and r.headers["retry-after"] == "7"
    assert r.json()["error"]["type"] == "rate_limit_error" and r.json()["type"] == "error"
    r = client.post("/api/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 429 and r.headers["retry-after"] == "7"
    assert set(r.json()) == {"error"} and isinstance(r.json()["error"], str)
    r = client.post("/v1/responses", json={"model": MODEL, "input": "hi"})
    assert r.status_code == 429 and r.headers["retry-after"] == "7"
    assert r.json()["error"]["type"] == "rate_limit_error"


def test_messages_accepts_what_claude_code_sends_and_a_prefill_is_continued() -> None:
    client, engine = make()
    body = MESSAGES | {"thinking": {"type": "adaptive"}, "context_management": {"edits": []},
                       "output_config": {"effort": "high"}, "cache_control": {"type": "ephemeral"},
                       "tool_choice": {"type": "auto"},  # without tools: nothing to choose, accepted
                       "messages": [{"role": "user", "content": "Say it"},
                                    {"role": "assistant", "content": "Sure:"}]}
    r = client.post("/v1/messages", json=body)
    assert r.status_code == 200, r.text
    assert engine.tokenizer.continued is True  # the assistant's "Sure:" is continued, not closed
    r = client.post("/v1/messages", json=MESSAGES | {"output_config": {"format": {
        "type": "json_schema", "schema": {"type": "object"}}}})
    assert r.status_code == 200 and engine.calls[-1].params.structured.kind == "json"


def test_messages_tool_call_cut_by_max_tokens_is_max_tokens_not_an_error() -> None:
    call = '{"tool_calls":[{"name":"get_weather","arguments":{"ci'
    client, _ = make(FakeEngine(script=script_texts({(0, 0): [call]}, reasons={(0, 0): "length"})))
    tools = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    r = client.post("/v1/messages", json=MESSAGES | {"tools": tools, "tool_choice": {"type": "any"}})
    assert r.status_code == 200, r.text
    assert r.json()["stop_reason"] == "max_tokens" and r.json()["content"][0]["input"] == {}


def test_count_tokens_counts_what_the_chat_would_hold() -> None:
    client, engine = make()
    r = client.post("/v1/messages/count_tokens", json={"model": MODEL, "system": "Be brief.",
                                                       "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200 and r.json() == {"input_tokens": len("Be brief.Hi")}  # the fake's count
    assert engine.calls == []  # nothing ran


# -- Responses ------------------------------------------------------------------------------------
def test_responses_non_streamed_output_items_and_usage() -> None:
    client, engine = make(FakeEngine(script=script_texts({(0, 0): ["Hi", "!"]}, cached=1)))
    r = client.post("/v1/responses", json={"model": MODEL, "input": [
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"}]}],
        "instructions": "You are terse.", "max_output_tokens": 9})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "response" and out["status"] == "completed" and out["id"].startswith("resp_")
    (item,) = out["output"]
    assert item["type"] == "message" and item["role"] == "assistant" and item["status"] == "completed"
    assert item["content"] == [{"type": "output_text", "text": "Hi!", "annotations": [], "logprobs": []}]
    assert out["output_text"] == "Hi!"
    prompt = len(engine.calls[0].prompts[0])
    assert out["usage"] == {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 1},
                            "output_tokens": 2, "output_tokens_details": {"reasoning_tokens": 0},
                            "total_tokens": prompt + 2}
    messages, _ = engine.tokenizer.chats[0]
    assert [m["role"] for m in messages] == ["system", "system", "user"]
    assert engine.calls[0].params.max_tokens == 9


def test_responses_incomplete_at_max_output_tokens() -> None:
    client, _ = make(FakeEngine(script=script_texts({(0, 0): ["a"]}, reasons={(0, 0): "length"})))
    out = client.post("/v1/responses", json={"model": MODEL, "input": "hi"}).json()
    assert out["status"] == "incomplete" and out["incomplete_details"] == {"reason": "max_output_tokens"}


def test_responses_stream_event_order_and_sequence_numbers() -> None:
    client, _ = make(FakeEngine(script=script_texts({(0, 0): ["Hel", "lo"]})))
    r = client.post("/v1/responses", json={"model": MODEL, "input": "hi", "stream": True})
    evs = sse(r.text)
    assert [e for e, _ in evs] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]
    assert [p["sequence_number"] for _, p in evs] == list(range(len(evs)))
    assert evs[0][1]["response"]["status"] == "in_progress"
    assert evs[6][1]["text"] == "Hello"
    done = evs[-1][1]["response"]
    assert done["status"] == "completed" and done["output"][0]["content"][0]["text"] == "Hello"
    assert "[DONE]" not in r.text  # the Responses stream ends with response.completed


def test_responses_function_call_round_trip() -> None:
    call = '{"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris"}}]}'
    client, engine = make(FakeEngine(script=script_texts({(0, 0): [call[:25], call[25:]]})))
    tools = [{"type": "function", "name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
    r = client.post("/v1/responses", json={"model": MODEL, "input": "Weather?", "tools": tools,
                                           "tool_choice": "required", "stream": True})
    evs = sse(r.text)
    kinds = [e for e, _ in evs]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert "response.function_call_arguments.delta" in kinds
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done",
                          "response.completed"]
    item = evs[-1][1]["response"]["output"][0]
    assert item["type"] == "function_call" and item["name"] == "get_weather"
    assert json.loads(item["arguments"]) == {"city": "Paris"} and item["call_id"].startswith("call_")
    # the client sends the call and its output back, statelessly
    back = [{"role": "user", "content": "Weather?"}, item | {"status": "completed"},
            {"type": "function_call_output", "call_id": item["call_id"], "output": "18C"}]
    r = client.post("/v1/responses", json={"model": MODEL, "input": back, "tools": tools})
    assert r.status_code == 200, r.text
    messages, _ = engine.tokenizer.chats[-1]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert "Function result (get_weather): 18C" in messages[-1]["content"]


@pytest.mark.parametrize("field,value,message", [
    ("previous_response_id", "resp_1", "keeps no responses"), ("store", True, "keeps no responses"),
    ("reasoning", {"effort": "low"}, "'reasoning' is not supported"),
    ("tools", [{"type": "web_search"}], "tools of type 'web_search'"),
    ("input", [{"type": "reasoning", "summary": []}], "input items of type 'reasoning'")])
def test_responses_refuses_what_it_cannot_honour(field: str, value: Any, message: str) -> None:
    client, engine = make()
    r = client.post("/v1/responses", json={"model": MODEL, "input": "hi"} | {field: value})
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    assert engine.calls == []


def test_responses_text_format_json_schema_becomes_the_grammar() -> None:
    client, engine = make()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    r = client.post("/v1/responses", json={"model": MODEL, "input": "hi", "text": {"format": {
        "type": "json_schema", "name": "x", "schema": schema, "strict": True}}})
    assert r.status_code == 200, r.text
    structured = engine.calls[0].params.structured
    assert structured is not None and structured.kind == "json" and json.loads(structured.value) == schema


# -- Ollama ---------------------------------------------------------------------------------------
def test_ollama_chat_streams_ndjson_by_default_with_counters_last() -> None:
    client, engine = make(FakeEngine(script=script_texts({(0, 0): ["Hel", "lo"]})))
    r = client.post("/api/chat", json={"model": f"{MODEL}:latest", "messages": [{"role": "user",
                                                                                  "content": "hi"}],
                                       "options": {"num_predict": 5, "temperature": 0.1, "seed": 3}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert [x["message"]["content"] for x in lines] == ["Hel", "lo", ""]
    assert [x["done"] for x in lines] == [False, False, True]
    last = lines[-1]
    assert last["done_reason"] == "stop" and last["eval_count"] == 2
    assert last["prompt_eval_count"] == len(engine.calls[0].prompts[0])
    assert all(isinstance(last[k], int) for k in ("total_duration", "prompt_eval_duration", "eval_duration"))
    p = engine.calls[0].params
    assert (p.max_tokens, p.temperature, p.seed) == (5, 0.1, 3)


def test_ollama_num_ctx_is_honoured_not_truncated() -> None:
    client, engine = make()
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "stream": False}
    r = client.post("/api/chat", json=chat | {"options": {"num_ctx": 100_000}})
    assert r.status_code == 400 and "more than this model's context length" in r.json()["error"]
    r = client.post("/api/chat", json=chat | {"options": {"num_ctx": 3}})
    assert r.status_code == 400 and "num_ctx" in r.json()["error"]
    r = client.post("/api/chat", json=chat | {"options": {"num_ctx": 20}})
    assert r.status_code == 200 and engine.calls[-1].params.max_tokens == 20 - len("hello")
    r = client.post("/api/chat", json=chat | {"options": {"mirostat": 2}})
    assert r.status_code == 400 and "mirostat" in r.json()["error"]


def test_ollama_generate_raw_and_format_json() -> None:
    client, engine = make(FakeEngine(script=script_texts({(0, 0): ["{}"]})))
    r = client.post("/api/generate", json={"model": MODEL, "prompt": "Once", "raw": True, "stream": False,
                                           "format": "json"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["response"] == "{}" and out["done"] is True and out["eval_count"] == 1
    assert engine.calls[0].prompts[0] == [ord(c) for c in "Once"]  # no template
    assert engine.tokenizer.chats == []
    assert engine.calls[0].params.structured.value == '{"type": "object"}'
    r = client.post("/api/generate", json={"model": MODEL, "prompt": ""})
    assert r.json()["done_reason"] == "load"


def test_ollama_errors_and_tags() -> None:
    client, _ = make()
    r = client.post("/api/chat", json={"model": "llama2", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and set(r.json()) == {"error"}
    r = client.post("/api/chat", json={"model": MODEL, "messages": [{"role": "pirate", "content": "x"}]})
    assert r.status_code == 400 and isinstance(r.json()["error"], str)
    r = client.post("/api/chat", json={"model": MODEL, "keep_alive": 0, "messages": [{"role": "user",
                                                                                      "content": "x"}]})
    assert r.status_code == 400 and "keep_alive" in r.json()["error"]
    assert client.get("/api/version").json()["version"]
    r = client.post("/api/chat", json={"model": MODEL, "messages": []})  # Ollama's "load the model"
    assert r.status_code == 200 and r.json()["done_reason"] == "load"
    r = client.post("/api/generate", json={"model": MODEL, "prompt": "x", "raw": True, "system": "s"})
    assert r.status_code == 400 and "raw" in r.json()["error"]
    # An empty stop string is refused by the schema itself, in Ollama's shape (it was refused later, with
    # a message about another field's type, and the published schema allowed it).
    r = client.post("/api/generate", json={"model": MODEL, "prompt": "x", "options": {"stop": ["a", ""]}})
    assert r.status_code == 400 and "stop" in r.json()["error"]
    assert "at least 1 character" in r.json()["error"]
    stop = client.get("/openapi.json").json()["components"]["schemas"]["Options"]["properties"]["stop"]
    assert stop["anyOf"][0]["items"]["minLength"] == 1


def test_ollama_parallel_results_of_one_tool_answer_its_calls_in_order() -> None:
    client, engine = make(FakeEngine(tokenizer=FakeTokenizer(NATIVE_TEMPLATE)))
    tools = [{"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}]
    calls = [{"function": {"name": "w", "arguments": {"city": c}}} for c in ("Paris", "Rome")]
    r = client.post("/api/chat", json={"model": MODEL, "stream": False, "tools": tools, "messages": [
        {"role": "user", "content": "both"}, {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "tool_name": "w", "content": "18C"}, {"role": "tool", "tool_name": "w",
                                                                "content": "25C"}]})
    assert r.status_code == 200, r.text
    messages, _ = engine.tokenizer.chats[0]
    ids = [c["id"] for c in messages[1]["tool_calls"]]
    assert [m.get("tool_call_id") for m in messages[2:]] == ids and len(set(ids)) == 2


# -- metrics ----------------------------------------------------------------------------------------
def test_vllm_metric_names_are_aliases_with_the_model_label() -> None:
    client, _ = make()
    text = client.get("/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert f"# TYPE {name} gauge" in text and f'{name}{{model_name="{MODEL}"}} 0.0' in text
    for name in ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits"):
        assert f"{name}_total counter" in text and f'{name}_total{{model_name="{MODEL}"}} 0.0' in text
    assert "llamaserve_num_requests_running 0.0" in text


# -- every new route: disconnects abort, body limits and access-log lines as elsewhere ----------------
NEW_ROUTES = [("/v1/messages", MESSAGES), ("/v1/responses", {"model": MODEL, "input": "hi"}),
              ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
              ("/api/generate", {"model": MODEL, "prompt": "hi"})]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path,body", NEW_ROUTES, ids=[p for p, _ in NEW_ROUTES])
def test_a_client_leaving_aborts_the_request(path: str, body: dict, stream: bool) -> None:
    import asyncio

    from llamaserve.server.app import create_app
    from llamaserve.server.settings import ServerSettings
    from tests.server.test_routes import call_asgi

    engine = FakeEngine(script=script_texts({(0, 0): ["a", "b", "c"]}), hang_after=1)  # never finishes
    app = create_app(engine, ServerSettings(log_requests=False), MODEL)  # type: ignore[arg-type]
    sent, left_at = asyncio.run(call_asgi(app, path, body | {"stream": stream}, disconnect_after=0.3))
    assert left_at and engine.aborted == ["req1-0"] and engine.finished == []
    assert engine.abort_times[0] >= left_at


@pytest.mark.parametrize("path,body", NEW_ROUTES, ids=[p for p, _ in NEW_ROUTES])
def test_body_limit_and_access_log_line(path: str, body: dict, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    client, _ = make(max_body_bytes=2048)
    r = client.post(path, json=body | {"padding": "x" * 4096})
    assert r.status_code == 413
    shape = r.json()
    assert shape["type"] == "error" if path.startswith("/v1/messages") else "error" in shape
    from starlette.testclient import TestClient

    from llamaserve.server.app import create_app
    from llamaserve.server.settings import ServerSettings

    engine = FakeEngine(script=script_texts({(0, 0): ["ok"]}))
    client = TestClient(create_app(engine, ServerSettings(), MODEL))  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="llamaserve.access"):
        assert client.post(path, json=body | {"stream": False}).status_code == 200
    lines = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "llamaserve.access"]
    assert lines and lines[-1]["path"] == path and lines[-1]["status"] == 200
    assert lines[-1]["completion_tokens"] == 1


def test_ollama_embed_refuses_sampling_options_rather_than_ignoring_them() -> None:
    client, _ = make()
    r = client.post("/api/embed", json={"model": MODEL, "input": "hi", "options": {"temperature": 0.5}})
    assert r.status_code == 400 and "temperature" in r.json()["error"]
    r = client.post("/api/embed", json={"model": MODEL, "input": "hi", "options": {"num_ctx": 10**7}})
    assert r.status_code == 400 and "num_ctx" in r.json()["error"]
