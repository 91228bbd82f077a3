"""Tool calling through the openai SDK: tool_choice, streamed calls, parallel calls, tool results as history.

The model's own chat template knows no tools; with tool_choice "required" or a named function the server
forces the calls by grammar, so each call's arguments are JSON valid against that function's parameters.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import openai
import pytest
from openai import OpenAI

from tests.e2e.conftest import MODEL, Live

MAX_TOKENS = 160
CITY = {"type": "string", "minLength": 1, "maxLength": 20}


def function(name: str, description: str, properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "function", "function": {
        "name": name, "description": description, **extra,
        "parameters": {"type": "object", "properties": properties, "required": list(properties),
                       "additionalProperties": False}}}


WEATHER = function("get_weather", "Get the current weather in a city.",
                   {"city": CITY, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}})
TIME = function("get_time", "Get the local time in a city.", {"city": CITY}, strict=True)
PACK = function("pack_bag", "Pack a bag with up to three items.", {
    "items": {"type": "array", "minItems": 1, "maxItems": 3,
              "items": {"type": "string", "minLength": 1, "maxLength": 12}},
    "heavy": {"type": "boolean"}})
TOOLS = [WEATHER, TIME, PACK]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
ASK_TWO = [{"role": "user", "content": "What is the weather in Paris, and what time is it in Tokyo?"}]


def check_call(call_id: str | None, name: str | None, arguments: str | None) -> dict[str, Any]:
    """One call: a non-empty id, a known function, arguments valid against its parameters."""
    assert isinstance(call_id, str) and call_id, call_id
    assert name in PARAMETERS, name
    assert isinstance(arguments, str), arguments
    args = json.loads(arguments)
    jsonschema.validate(args, PARAMETERS[name], cls=jsonschema.Draft202012Validator)
    return args


def check_forced(r: Any) -> list[Any]:
    """A grammar-forced answer: tool calls only, each valid, distinct ids, finish_reason "tool_calls"."""
    choice = r.choices[0]
    calls = choice.message.tool_calls
    assert calls, choice.message
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    for c in calls:
        assert c.type == "function"
        check_call(c.id, c.function.name, c.function.arguments)
    assert len({c.id for c in calls}) == len(calls)
    return list(calls)


@dataclass
class Call:
    id: str
    name: str
    arguments: str = ""


@dataclass
class Streamed:
    """A streamed answer's tool calls by index (in order of first appearance), its text, finish, usage."""

    calls: dict[int, Call] = field(default_factory=dict)
    content: str = ""
    finish: str | None = None
    usage: Any = None
    argument_pieces: int = 0


def stream(client: OpenAI, **kw: Any) -> Streamed:
    out = Streamed()
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **kw):
        if chunk.usage is not None:
            out.usage = chunk.usage
        for choice in chunk.choices:
            assert choice.index == 0
            out.content += choice.delta.content or ""
            for tc in choice.delta.tool_calls or []:
                piece = tc.function.arguments if tc.function is not None else None
                if tc.index not in out.calls:  # its first delta names it
                    assert tc.id and tc.function is not None and tc.function.name, tc
                    assert tc.type in (None, "function")
                    out.calls[tc.index] = Call(tc.id, tc.function.name)
                else:
                    assert tc.id in (None, out.calls[tc.index].id), tc
                    assert tc.function is None or tc.function.name in (None, out.calls[tc.index].name), tc
                if piece:
                    out.calls[tc.index].arguments += piece
                    out.argument_pieces += 1
            if choice.finish_reason is not None:
                out.finish = choice.finish_reason
    return out


def check_streamed_forced(s: Streamed) -> list[Call]:
    assert s.calls and s.finish == "tool_calls", s
    assert s.content == ""
    assert sorted(s.calls) == list(range(len(s.calls)))  # indices 0..k-1
    for c in s.calls.values():
        check_call(c.id, c.name, c.arguments)
    assert len({c.id for c in s.calls.values()}) == len(s.calls)
    return [s.calls[i] for i in sorted(s.calls)]


@pytest.fixture(scope="module")
def client(server: Live) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{server.url}/v1", api_key=server.key, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def required(client: OpenAI) -> Any:
    """One greedy tool_choice "required" answer, shared by the tests that build on it."""
    return client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=TOOLS,  # type: ignore[arg-type]
                                          tool_choice="required", temperature=0, max_tokens=MAX_TOKENS)


# -- tool_choice ----------------------------------------------------------------------------------
def test_required(required: Any) -> None:
    check_forced(required)
    assert required.usage.completion_tokens <= MAX_TOKENS


@pytest.mark.parametrize("name", ["get_time", "pack_bag"])
def test_named_function(client: OpenAI, name: str) -> None:
    """A named tool_choice: every call is to that function."""
    r = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=TOOLS,  # type: ignore[arg-type]
                                       tool_choice={"type": "function", "function": {"name": name}},
                                       temperature=0, max_tokens=MAX_TOKENS)
    assert {c.function.name for c in check_forced(r)} == {name}


def test_none_answers_in_text(client: OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=TOOLS,  # type: ignore[arg-type]
                                       tool_choice="none", temperature=0, max_tokens=24)
    choice = r.choices[0]
    assert not choice.message.tool_calls
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")


@pytest.mark.parametrize("tool_choice", ["auto", None])
def test_auto(client: OpenAI, tool_choice: str | None) -> None:
    """"auto" (also the default with tools): text or tool calls, and whichever it is, well formed."""
    kw: dict[str, Any] = {} if tool_choice is None else {"tool_choice": tool_choice}
    r = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=TOOLS,  # type: ignore[arg-type]
                                       temperature=0, max_tokens=MAX_TOKENS, **kw)
    choice = r.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        for c in choice.message.tool_calls:
            check_call(c.id, c.function.name, c.function.arguments)
    else:
        assert isinstance(choice.message.content, str)
        assert choice.finish_reason in ("stop", "length")


def test_open_parameters_schema(client: OpenAI) -> None:
    """Parameters without additionalProperties (what langchain and instructor send): still a finished call."""
    params = {"type": "object", "properties": {"city": {"type": "string", "title": "City", "maxLength": 20}},
              "required": ["city"], "title": "GetTime"}
    tool = {"type": "function", "function": {"name": "GetTime", "description": "Get the time in a city.",
                                             "parameters": params}}
    r = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=[tool],  # type: ignore[list-item]
                                       tool_choice={"type": "function", "function": {"name": "GetTime"}},
                                       parallel_tool_calls=False, temperature=0, max_tokens=MAX_TOKENS)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
    for c in choice.message.tool_calls:
        assert c.id and c.function.name == "GetTime"
        jsonschema.validate(json.loads(c.function.arguments), params)


def test_parallel_tool_calls_false_makes_one_call(client: OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=ASK_TWO, tools=TOOLS,  # type: ignore[arg-type]
                                       tool_choice="required", parallel_tool_calls=False, temperature=0,
                                       max_tokens=MAX_TOKENS)
    assert len(check_forced(r)) == 1


def test_parallel_calls(client: OpenAI) -> None:
    """parallel_tool_calls: one call or more, each valid on its own."""
    r = client.chat.completions.create(model=MODEL, messages=ASK_TWO, tools=TOOLS,  # type: ignore[arg-type]
                                       tool_choice="required", parallel_tool_calls=True, temperature=0,
                                       max_tokens=200)
    assert 1 <= len(check_forced(r))


# -- streaming ------------------------------------------------------------------------------------
def test_required_streamed_matches_non_streamed(client: OpenAI, required: Any) -> None:
    """Greedy: the streamed calls (id and name first, arguments in pieces) are the non-streamed ones."""
    s = stream(client, messages=ASK_WEATHER, tools=TOOLS, tool_choice="required", temperature=0,
               max_tokens=MAX_TOKENS, stream_options={"include_usage": True})
    calls = check_streamed_forced(s)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        (c.function.name, json.loads(c.function.arguments)) for c in required.choices[0].message.tool_calls]
    assert s.argument_pieces > len(calls)  # the arguments came in more than one piece each
    assert s.usage is not None and s.usage.completion_tokens == required.usage.completion_tokens


def test_named_function_streamed(client: OpenAI) -> None:
    s = stream(client, messages=ASK_WEATHER, tools=TOOLS, temperature=0, max_tokens=MAX_TOKENS,
               tool_choice={"type": "function", "function": {"name": "pack_bag"}})
    assert {c.name for c in check_streamed_forced(s)} == {"pack_bag"}


def test_parallel_calls_streamed(client: OpenAI) -> None:
    s = stream(client, messages=ASK_TWO, tools=TOOLS, tool_choice="required", parallel_tool_calls=True,
               temperature=0, max_tokens=200)
    assert 1 <= len(check_streamed_forced(s))


def test_none_streamed_has_no_calls(client: OpenAI) -> None:
    s = stream(client, messages=ASK_WEATHER, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=16)
    assert not s.calls and s.content and s.finish in ("stop", "length")


# -- tool results as history ----------------------------------------------------------------------
HISTORY: list[dict[str, Any]] = [
    *ASK_WEATHER,
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_abc123", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Paris","unit":"celsius"}'}}]},
    {"role": "tool", "tool_call_id": "call_abc123", "content": '{"temperature":21,"sky":"sunny"}'},
]


@pytest.mark.parametrize("with_tools", [True, False])
def test_tool_result_round_trip(client: OpenAI, with_tools: bool) -> None:
    """An assistant's tool_calls and the tool's answer as history, then a text answer."""
    kw: dict[str, Any] = {"tools": TOOLS, "tool_choice": "none"} if with_tools else {}
    r = client.chat.completions.create(model=MODEL, messages=HISTORY, temperature=0,  # type: ignore[arg-type]
                                       max_tokens=24, **kw)
    choice = r.choices[0]
    assert isinstance(choice.message.content, str) and choice.message.content
    assert not choice.message.tool_calls and choice.finish_reason in ("stop", "length")


def test_tool_result_as_content_parts(client: OpenAI) -> None:
    history = [*HISTORY[:2], {"role": "tool", "tool_call_id": "call_abc123",
                              "content": [{"type": "text", "text": '{"temperature":21}'}]}]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS,  # type: ignore[arg-type]
                                       tool_choice="none", temperature=0, max_tokens=16)
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].message.content


def test_sdk_message_sent_back(client: OpenAI, required: Any) -> None:
    """The SDK's response message object itself goes back as history, then the tools' results."""
    message = required.choices[0].message
    results = [{"role": "tool", "tool_call_id": c.id, "content": "21 degrees and sunny"}
               for c in message.tool_calls]
    r = client.chat.completions.create(model=MODEL, messages=[*ASK_WEATHER, message, *results],  # type: ignore[list-item]
                                       tools=TOOLS, tool_choice="none", temperature=0, max_tokens=24)
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].message.content
    assert not r.choices[0].message.tool_calls


def test_call_then_answer_then_call_again(client: OpenAI, required: Any) -> None:
    """After a tool result, a forced call is still a valid call (the history does not derail the grammar)."""
    message = required.choices[0].message
    results = [{"role": "tool", "tool_call_id": c.id, "content": "21 degrees and sunny"}
               for c in message.tool_calls]
    follow = [{"role": "user", "content": "And the time in Tokyo?"}]
    r = client.chat.completions.create(model=MODEL, messages=[*ASK_WEATHER, message, *results, *follow],  # type: ignore[list-item]
                                       tools=TOOLS, tool_choice="required", temperature=0,
                                       max_tokens=MAX_TOKENS)
    check_forced(r)


# -- errors (OpenAI answers these with 400 too) ---------------------------------------------------
def test_named_function_not_among_tools_is_a_400(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=TOOLS,  # type: ignore[arg-type]
                                       tool_choice={"type": "function", "function": {"name": "launch"}},
                                       max_tokens=4)
    assert e.value.status_code == 400 and "launch" in str(e.value)


def test_required_without_tools_is_a_400(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tool_choice="required",
                                       max_tokens=4)
    assert e.value.status_code == 400 and "tool" in str(e.value)
