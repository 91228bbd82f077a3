"""Tools with a chat template that takes them (Llama 3.x style): the template renders the tools and the
model answers in Llama 3's JSON, {"name": ..., "parameters": {...}}, which the server turns into tool_calls.

The template here is a small one of our own in the shape of Llama 3.1's (tools listed as JSON, past calls
written back as {"name", "parameters"}, tool results under the "ipython" role) over SmolLM2's weights.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import jsonschema
import pytest
from openai import OpenAI

from llamaserve.config import EngineConfig
from llamaserve.engine.async_engine import AsyncEngine
from llamaserve.engine.llm_engine import LLMEngine
from llamaserve.loader.tokenizer import Tokenizer
from llamaserve.server.app import create_app
from llamaserve.server.settings import ServerSettings
from tests.e2e.conftest import KEY, MODEL, Live, serve_app

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ 'ipython' if m.role == 'tool' else m.role }}\n"
    "{% if loop.first and tools %}Functions you can call, as JSON: {{ tools | tojson }}\n"
    'Respond with {"name": function name, "parameters": its arguments} to call one.\n{% endif %}'
    "{% if m.tool_calls %}{% for c in m.tool_calls %}"
    '{"name": "{{ c.function.name }}", "parameters": {{ c.function.arguments | tojson }}}'
    "{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def native(llm_engine: LLMEngine) -> Iterator[tuple[Live, OpenAI]]:
    tok = llm_engine.tokenizer
    engine = LLMEngine(llm_engine.runner.model, Tokenizer(tok.hf, TEMPLATE, tok.eos_token_ids),
                       EngineConfig(kv_cache_memory=0.05, max_num_seqs=4))
    async_engine = AsyncEngine(engine)
    async_engine.start()
    try:
        app = create_app(async_engine, ServerSettings(api_keys=(KEY,)), MODEL)
        with serve_app(app, async_engine) as live:
            with OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0, timeout=120) as client:
                yield live, client
    finally:
        async_engine.shutdown()


def test_the_template_renders_the_tools(native: tuple[Live, OpenAI]) -> None:
    live, _ = native
    with live.client() as c:
        plain = c.post("/tokenize", json={"messages": ASK}).json()["count"]
    # /tokenize takes no tools; the chat route's prompt with them is longer by the tools' JSON
    _, client = native
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                       max_tokens=60, temperature=0)
    assert r.usage.prompt_tokens > plain + 20


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_calls_come_back_as_tool_calls(native: tuple[Live, OpenAI], choice: object) -> None:
    _, client = native
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=choice,
                                       max_tokens=80, temperature=0)  # type: ignore[arg-type]
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None and c.message.tool_calls
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for call in c.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    if isinstance(choice, dict):
        assert [call.function.name for call in c.message.tool_calls] == ["get_time"]


def test_streamed_native_call_reassembles(native: tuple[Live, OpenAI]) -> None:
    _, client = native
    args, names, finish = "", [], None
    for chunk in client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], stream=True,
                                                tool_choice="required", max_tokens=60, temperature=0):
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                names += [d.function.name] if d.function and d.function.name else []
                args += (d.function.arguments or "") if d.function else ""
            finish = c.finish_reason or finish
    assert names == ["get_weather"] and finish == "tool_calls"
    jsonschema.validate(json.loads(args), WEATHER["function"]["parameters"])


def test_history_with_a_call_and_its_result(native: tuple[Live, OpenAI]) -> None:
    _, client = native
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], tool_choice="none",
                                       max_tokens=20, temperature=0)
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].message.tool_calls is None
