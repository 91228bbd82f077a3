"""Real client libraries against the server: langchain-openai's ChatOpenAI and instructor.

What they send differs from hand-written requests (langchain: max_completion_tokens, parallel_tool_calls
false, strict pydantic schemas through the SDK's parse(); instructor: non-strict schemas with titles, a
named tool_choice), so these catch what the SDK tests cannot. Models are small and bounded (maxLength,
integer ranges) so a 135M model completes them within max_tokens.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Annotated, Any, Literal

import instructor
import jsonschema
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_openai import ChatOpenAI
from openai import OpenAI
from pydantic import BaseModel, ConfigDict, Field

from tests.e2e.conftest import MODEL, Live

MAX_TOKENS = 160
PROMPT = "Paris is the capital of France and has about 2 million people. Describe the city."


class City(BaseModel):
    """A city and its country."""

    name: str = Field(min_length=1, max_length=20)
    country: str = Field(min_length=1, max_length=20)
    population_millions: int = Field(ge=0, le=50)


class GetTime(BaseModel):
    """Get the local time in a city."""

    city: str = Field(min_length=1, max_length=20)


def get_weather(city: Annotated[str, Field(max_length=20)], unit: Literal["celsius", "fahrenheit"]) -> str:
    """Get the current weather in a city."""
    return f"21 degrees {unit} in {city}"


@tool
def pack_bag(items: Annotated[list[Annotated[str, Field(max_length=12)]], Field(min_length=1, max_length=3)]
             ) -> str:
    """Pack a bag with up to three items."""
    return "packed"


LC_TOOLS: list[Any] = [get_weather, GetTime, pack_bag]
LC_FUNCTIONS = [convert_to_openai_tool(t)["function"] for t in LC_TOOLS]
LC_PARAMETERS = {f["name"]: f["parameters"] for f in LC_FUNCTIONS}
ASK_WEATHER = "What is the weather in Paris?"


def check_lc_calls(message: BaseMessage) -> list[dict[str, Any]]:
    """An AIMessage with tool calls: each names a bound tool, has an id and arguments valid for it."""
    assert isinstance(message, AIMessage), message
    assert message.tool_calls, message
    assert not message.invalid_tool_calls, message.invalid_tool_calls
    for call in message.tool_calls:
        assert call["id"], call
        assert call["name"] in LC_PARAMETERS, call
        jsonschema.validate(call["args"], LC_PARAMETERS[call["name"]], cls=jsonschema.Draft202012Validator)
    return list(message.tool_calls)


# -- langchain-openai -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm(server: Live) -> ChatOpenAI:
    return ChatOpenAI(base_url=f"{server.url}/v1", api_key=server.key, model=MODEL,  # type: ignore[arg-type]
                      temperature=0, max_retries=0, max_tokens=MAX_TOKENS, timeout=120)  # type: ignore[call-arg]


@pytest.mark.parametrize("method", [None, "json_schema", "function_calling"])
def test_langchain_with_structured_output(llm: ChatOpenAI, method: str | None) -> None:
    """The installed version's default method (json_schema in langchain-openai 1.x) and the others."""
    runnable = llm.with_structured_output(City) if method is None else llm.with_structured_output(
        City, method=method)  # type: ignore[arg-type]
    city = runnable.invoke(PROMPT)
    assert isinstance(city, City), city


def test_langchain_with_structured_output_include_raw(llm: ChatOpenAI) -> None:
    out = llm.with_structured_output(City, include_raw=True).invoke(PROMPT)
    assert isinstance(out, dict) and out["parsing_error"] is None, out
    assert isinstance(out["parsed"], City)
    raw = out["raw"]
    assert isinstance(raw, AIMessage) and raw.response_metadata.get("finish_reason") == "stop"
    assert City.model_validate_json(str(raw.content)) == out["parsed"]


def test_langchain_with_structured_output_streamed(llm: ChatOpenAI) -> None:
    """Streamed (langchain uses the SDK's beta stream helper here): the last chunk is the parsed model."""
    chunks = list(llm.with_structured_output(City).stream(PROMPT))
    assert chunks and isinstance(chunks[-1], City), chunks


def test_langchain_with_structured_output_async(llm: ChatOpenAI) -> None:
    city = asyncio.run(llm.with_structured_output(City).ainvoke(PROMPT))
    assert isinstance(city, City), city


def test_langchain_json_mode(llm: ChatOpenAI) -> None:
    """method="json_mode" without a schema: response_format json_object, parsed into a dict.

    json_object bounds nothing, so the prompt is one this model answers briefly (others loop to max_tokens).
    """
    prompt = "Paris is the capital of France. Describe it in a few words, as JSON."
    out = llm.with_structured_output(method="json_mode").invoke(prompt)
    assert isinstance(out, dict), out


@pytest.mark.parametrize("tool_choice", ["required", "any", True])
def test_langchain_bind_tools_required(llm: ChatOpenAI, tool_choice: Any) -> None:
    """"required", "any" and True all become tool_choice "required"."""
    check_lc_calls(llm.bind_tools(LC_TOOLS, tool_choice=tool_choice).invoke(ASK_WEATHER))


@pytest.mark.parametrize("name", ["get_weather", "GetTime", "pack_bag"])
def test_langchain_bind_tools_named(llm: ChatOpenAI, name: str) -> None:
    """A tool's name as tool_choice (a python function, a pydantic class, an @tool)."""
    calls = check_lc_calls(llm.bind_tools(LC_TOOLS, tool_choice=name).invoke(ASK_WEATHER))
    assert {c["name"] for c in calls} == {name}
    if name == "GetTime":
        assert all(isinstance(GetTime.model_validate(c["args"]), GetTime) for c in calls)


def test_langchain_bind_tools_strict_no_parallel(llm: ChatOpenAI) -> None:
    """strict=True (schemas closed, "strict" sent) and parallel_tool_calls=False: exactly one call."""
    message = llm.bind_tools(LC_TOOLS, tool_choice="required", strict=True,
                             parallel_tool_calls=False).invoke(ASK_WEATHER)
    assert len(check_lc_calls(message)) == 1


def test_langchain_bind_tools_streamed(llm: ChatOpenAI) -> None:
    """Streamed tool-call chunks add up to valid tool calls."""
    total: AIMessageChunk | None = None
    for chunk in llm.bind_tools(LC_TOOLS, tool_choice="required").stream(ASK_WEATHER):
        assert isinstance(chunk, AIMessageChunk)
        total = chunk if total is None else total + chunk
    assert total is not None
    check_lc_calls(total)
    assert total.response_metadata.get("finish_reason") == "tool_calls"


def test_langchain_tool_round_trip(llm: ChatOpenAI) -> None:
    """Call, run the tools, send the results back (ToolMessage): the answer is text."""
    question = HumanMessage(ASK_WEATHER)
    asked = llm.bind_tools(LC_TOOLS, tool_choice="required").invoke([question])
    calls = check_lc_calls(asked)
    results = [ToolMessage("21 degrees and sunny", tool_call_id=c["id"]) for c in calls]
    answer = llm.bind_tools(LC_TOOLS, tool_choice="none").invoke([question, asked, *results])
    assert isinstance(answer, AIMessage) and not answer.tool_calls
    assert isinstance(answer.content, str) and answer.content


# -- instructor -----------------------------------------------------------------------------------
class Anything(BaseModel):
    """Any JSON object: json_object mode guarantees an object, not a small model's choice of fields."""

    model_config = ConfigDict(extra="allow")


@pytest.fixture(scope="module")
def openai_client(server: Live) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{server.url}/v1", api_key=server.key, max_retries=0, timeout=120) as c:
        yield c


def _mode(name: str) -> Any:
    mode = getattr(instructor.Mode, name, None)
    if mode is None:
        pytest.skip(f"this instructor has no Mode.{name}")
    return mode


@pytest.mark.parametrize(("mode", "finish"), [(None, "tool_calls"), ("TOOLS", "tool_calls"),
                                              ("JSON_SCHEMA", "stop")])
def test_instructor(openai_client: OpenAI, mode: str | None, finish: str) -> None:
    """from_openai (default mode TOOLS, then the named modes): create() returns the model, no retries."""
    client = instructor.from_openai(openai_client) if mode is None else instructor.from_openai(
        openai_client, mode=_mode(mode))
    if mode is None:
        assert client.mode == instructor.Mode.TOOLS
    city, completion = client.chat.completions.create_with_completion(
        model=MODEL, response_model=City, messages=[{"role": "user", "content": PROMPT}],
        max_tokens=MAX_TOKENS, temperature=0, max_retries=0)
    assert isinstance(city, City), city
    assert completion.choices[0].finish_reason == finish


def test_instructor_json_mode(openai_client: OpenAI) -> None:
    client = instructor.from_openai(openai_client, mode=_mode("JSON"))
    out, completion = client.chat.completions.create_with_completion(
        model=MODEL, response_model=Anything, messages=[{"role": "user", "content": PROMPT}],
        max_tokens=MAX_TOKENS, temperature=0, max_retries=0)
    assert isinstance(out, Anything)
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(completion.choices[0].message.content or ""), dict)


def test_instructor_partial_stream(openai_client: OpenAI) -> None:
    """create_partial (a streamed tool call): partial models, the last one complete."""
    client = instructor.from_openai(openai_client)
    partials = list(client.chat.completions.create_partial(
        model=MODEL, response_model=City, messages=[{"role": "user", "content": PROMPT}],
        max_tokens=MAX_TOKENS, temperature=0, max_retries=0))
    assert partials
    assert isinstance(City.model_validate(partials[-1].model_dump()), City)
