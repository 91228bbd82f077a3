"""Each API through its own official client against the live server (the embedded SmolLM2):
OpenAI's Responses (`responses.create`, `responses.stream`, a tool call round trip), Anthropic's
Messages (`messages.create`, `messages.stream` with text and with a tool, `count_tokens`), Ollama
(`list`, `chat`, streamed `generate`, `embed`), OpenAI embeddings; auth and error shapes per route."""

from __future__ import annotations

import base64
import json
import math

import anthropic
import httpx
import numpy as np
import ollama
import openai
import pytest
import torch

from tests.e2e.conftest import KEY, MODEL, Live

# Anthropic's SDK no longer has sampling parameters; older clients send them and the server takes them.
GREEDY = {"temperature": 0}
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


@pytest.fixture(scope="module")
def oai(server: Live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def claude(server: Live) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def olla(server: Live) -> ollama.Client:
    return ollama.Client(host=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


# -- OpenAI Responses -----------------------------------------------------------------------------
def test_responses_create(oai: openai.OpenAI) -> None:
    r = oai.responses.create(model=MODEL, input="Name a colour.", instructions="Answer in one word.",
                             max_output_tokens=8, temperature=0)
    assert r.status in ("completed", "incomplete") and r.output_text.strip()
    assert r.output[0].type == "message" and r.output[0].content[0].type == "output_text"
    assert r.usage is not None and r.usage.output_tokens >= 1 and r.usage.input_tokens > 5


def test_responses_stream_event_order(oai: openai.OpenAI) -> None:
    with oai.responses.stream(model=MODEL, input="Name a colour.", instructions="Answer in one word.",
                              max_output_tokens=40, temperature=0) as stream:
        events = list(stream)
        kinds = [e.type for e in events]
        final = stream.get_final_response()  # needs response.completed (the SDK knows no other end)
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.output_text.strip() and final.status == "completed"


def test_responses_stream_cut_at_max_output_tokens_ends_incomplete(oai: openai.OpenAI) -> None:
    """As the API documents: response.incomplete, with incomplete_details (the SDK's helper then has no
    final response, so the raw stream is read)."""
    stream = oai.responses.create(model=MODEL, input="Count to twenty.", max_output_tokens=4, temperature=0,
                                  stream=True)
    events = list(stream)
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert events[-1].response.usage.output_tokens == 4


def test_responses_tool_call_round_trip(oai: openai.OpenAI) -> None:
    tools = [{"type": "function", "name": "get_weather", "description": "Current weather in a city",
              "parameters": WEATHER}]
    r = oai.responses.create(model=MODEL, input="What is the weather in Paris?", tools=tools,
                             tool_choice="required", parallel_tool_calls=False, temperature=0,
                             max_output_tokens=60)
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments)["city"], str)
    history = [{"role": "user", "content": "What is the weather in Paris?"},
               call.model_dump(exclude_none=True),
               {"type": "function_call_output", "call_id": call.call_id, "output": "18C and sunny"}]
    r2 = oai.responses.create(model=MODEL, input=history, tools=tools, temperature=0, max_output_tokens=24)
    assert r2.output_text.strip() or any(o.type == "function_call" for o in r2.output)


def test_responses_json_schema_text_format(oai: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 12}},
              "required": ["colour"], "additionalProperties": False}
    r = oai.responses.create(model=MODEL, input="Name a colour as JSON.", temperature=0, max_output_tokens=40,
                             text={"format": {"type": "json_schema", "name": "c", "schema": schema}})
    assert isinstance(json.loads(r.output_text)["colour"], str)


def test_responses_previous_response_id_is_a_clear_400(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="keeps no responses"):
        oai.responses.create(model=MODEL, input="hi", previous_response_id="resp_123")


# -- Anthropic Messages ---------------------------------------------------------------------------
def test_messages_create(claude: anthropic.Anthropic) -> None:
    m = claude.messages.create(model=MODEL, max_tokens=8, system="Answer in one word.", extra_body=GREEDY,
                               messages=[{"role": "user", "content": "Name a colour."}])
    assert m.type == "message" and m.role == "assistant" and m.content[0].type == "text"
    assert m.content[0].text.strip() and m.stop_reason in ("end_turn", "max_tokens")
    assert m.usage.output_tokens >= 1 and m.usage.input_tokens > 5


def test_messages_stream_text(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(model=MODEL, max_tokens=6, extra_body=GREEDY,
                                messages=[{"role": "user", "content": "Count: one, two,"}]) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    raw = [k for k in kinds if k not in ("text",)]  # the SDK adds its own "text" events
    assert raw[:2] == ["message_start", "content_block_start"]
    assert raw[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert final.content[0].text and final.stop_reason == "max_tokens"


def test_messages_stream_with_a_tool(claude: anthropic.Anthropic) -> None:
    tools = [{"name": "get_weather", "description": "Current weather in a city", "input_schema": WEATHER}]
    with claude.messages.stream(model=MODEL, max_tokens=60, extra_body=GREEDY, tools=tools,
                                tool_choice={"type": "any", "disable_parallel_tool_use": True},
                                messages=[{"role": "user", "content": "Weather in Paris?"}]) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert "input_json" in kinds  # the SDK's event for each input_json_delta
    (use,) = [b for b in final.content if b.type == "tool_use"]
    assert use.name == "get_weather" and isinstance(use.input["city"], str)
    assert final.stop_reason == "tool_use"
    # the result goes back as a tool_result block
    m = claude.messages.create(model=MODEL, max_tokens=16, extra_body=GREEDY, tools=tools, messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [b.model_dump() for b in final.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18C"}]}])
    assert m.content


def test_count_tokens_matches_tokenize(claude: anthropic.Anthropic, server: Live) -> None:
    messages = [{"role": "user", "content": "How many tokens is this?"}]
    counted = claude.messages.count_tokens(model=MODEL, system="Be brief.", messages=messages)
    with server.client() as c:
        ours = c.post("/tokenize", json={"messages": [{"role": "system", "content": "Be brief."}] + messages})
    assert counted.input_tokens == ours.json()["count"]


def test_anthropic_errors_and_auth(server: Live) -> None:
    bad = anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    r = httpx.post(f"{server.url}/v1/messages", headers={"x-api-key": KEY},
                   json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["type"] == "error"
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and "max_tokens" in error["message"]


# -- Ollama ---------------------------------------------------------------------------------------
def test_ollama_list_show_ps(olla: ollama.Client) -> None:
    (m,) = olla.list().models
    assert m.model == f"{MODEL}:latest" and m.details.family == "llama" and m.details.format == "gguf"
    assert m.size > 50_000_000 and m.details.quantization_level
    shown = olla.show(MODEL)
    assert shown.modelinfo["llama.context_length"] > 0 and "tools" in shown.capabilities
    assert olla.ps().models[0].model == f"{MODEL}:latest"


def test_ollama_chat(olla: ollama.Client) -> None:
    r = olla.chat(model=MODEL, messages=[{"role": "user", "content": "Name a colour."}],
                  options={"num_predict": 8, "temperature": 0})
    assert r.done and r.message.role == "assistant" and r.message.content.strip()
    assert r.eval_count >= 1 and r.prompt_eval_count > 5 and r.total_duration > 0


def test_ollama_streamed_generate(olla: ollama.Client) -> None:
    parts = list(olla.generate(model=MODEL, prompt="Count: one, two,", stream=True,
                               options={"num_predict": 6, "temperature": 0}))
    assert len(parts) >= 2 and [p.done for p in parts].count(True) == 1 and parts[-1].done
    assert "".join(p.response for p in parts).strip()
    assert parts[-1].eval_count == 6 and parts[-1].done_reason == "length"


def test_ollama_chat_with_a_tool_and_format(olla: ollama.Client) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": WEATHER}}]
    r = olla.chat(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris? Use the tool."}],
                  tools=tools, options={"num_predict": 60, "temperature": 0})
    if r.message.tool_calls:  # "auto": the model may also answer in text
        assert r.message.tool_calls[0].function.name == "get_weather"
    j = olla.chat(model=MODEL, messages=[{"role": "user", "content": "A colour as JSON."}], format="json",
                  options={"num_predict": 24, "temperature": 0})
    assert j.done_reason == "length" or isinstance(json.loads(j.message.content), dict)


def test_ollama_num_ctx_above_the_context_is_an_error(olla: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError, match="num_ctx") as e:
        olla.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}], options={"num_ctx": 10**7})
    assert e.value.status_code == 400


def test_ollama_embed(olla: ollama.Client) -> None:
    r = olla.embed(model=MODEL, input=["a cat", "a dog"])
    assert len(r.embeddings) == 2 and all(math.isclose(np.linalg.norm(v), 1.0, rel_tol=1e-4)
                                          for v in r.embeddings)
    assert r.prompt_eval_count >= 4


# -- OpenAI embeddings ----------------------------------------------------------------------------
def test_embeddings_float_and_base64(oai: openai.OpenAI) -> None:
    e = oai.embeddings.create(model=MODEL, input=["The cat sat.", "The cat sat.", "Stock markets fell."])
    v = [np.array(d.embedding) for d in e.data]
    assert [d.index for d in e.data] == [0, 1, 2] and all(math.isclose(np.linalg.norm(x), 1.0, rel_tol=1e-4)
                                                          for x in v)
    assert np.allclose(v[0], v[1], atol=1e-5)  # the same text, the same vector (batched or not)
    assert e.usage.prompt_tokens > 6
    b = oai.embeddings.create(model=MODEL, input="The cat sat.", encoding_format="base64")
    raw = np.frombuffer(base64.b64decode(b.data[0].embedding), dtype="<f4")  # asked for: left encoded
    assert np.allclose(raw, v[0], atol=1e-5)
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        oai.embeddings.create(model=MODEL, input="x", dimensions=8)


def test_embeddings_of_token_ids_and_raw_base64(server: Live) -> None:
    with server.client() as c:
        r = c.post("/v1/embeddings", json={"model": MODEL, "input": [[1, 2, 3], [4, 5]],
                                           "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    vectors = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in r.json()["data"]]
    assert len(vectors) == 2 and vectors[0].shape == vectors[1].shape
    assert r.json()["usage"]["prompt_tokens"] == 5


def test_the_embedding_is_the_models_own_hidden_state(server: Live, llm_engine) -> None:  # noqa: ANN001
    """hidden_states (no KV cache) agrees with the engine's paged forward: the greedy next token from its
    last position is the one generation picks."""
    ids = llm_engine.tokenizer.encode("The capital of France is")
    with torch.inference_mode():
        model = llm_engine.runner.model
        ours = int(model.logits(model.hidden_states(torch.tensor(ids))[-1:]).argmax())
    with server.client() as c:
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 1,
                                            "temperature": 0})
    assert r.json()["choices"][0]["text"] == llm_engine.tokenizer.decode([ours])


def test_embeddings_do_not_stall_generation(server: Live) -> None:
    """A stream keeps producing while a batch of embeddings runs beside it."""
    import threading
    import time

    times: list[float] = []

    def stream() -> None:
        with server.client() as c, c.stream("POST", "/v1/completions", json={
                "model": MODEL, "prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": True,
                "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    times.append(time.monotonic())

    t = threading.Thread(target=stream)
    t.start()
    with server.client() as c:
        r = c.post("/v1/embeddings", json={"model": MODEL, "input": ["word " * 200] * 6})
    t.join(120)
    assert r.status_code == 200 and len(times) >= 40
    gaps = np.diff(times)
    assert gaps.max() < 10 * np.median(gaps) + 1.0  # interleaved one embedding per step, not all at once


# -- every new route: auth ------------------------------------------------------------------------
@pytest.mark.parametrize("method,path", [("POST", "/v1/responses"), ("POST", "/v1/messages"),
                                         ("POST", "/v1/messages/count_tokens"), ("GET", "/api/tags"),
                                         ("POST", "/api/show"), ("GET", "/api/ps"), ("POST", "/api/chat"),
                                         ("POST", "/api/generate"), ("POST", "/api/embed"),
                                         ("POST", "/v1/embeddings")])
def test_new_routes_need_the_key_and_answer_in_their_shape(server: Live, method: str, path: str) -> None:
    r = httpx.request(method, f"{server.url}{path}", json={})
    assert r.status_code == 401
    body = r.json()
    if path.startswith("/v1/messages"):
        assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
    elif path.startswith("/api/"):
        assert isinstance(body["error"], str)
    else:
        assert body["error"]["type"] == "authentication_error"
