"""Structured output through the openai SDK: response_format, vLLM's structured_outputs, parse() and streams.

Every output the grammar constrains is checked against its schema (jsonschema) or pattern, and must end with
finish_reason "stop": the schemas are bounded (maxLength, maxItems, integer ranges) so even a 135M model
completes them well inside max_tokens. Also: compile errors, refused fields and text content parts.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import jsonschema
import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from pydantic import BaseModel, Field

from tests.e2e.conftest import MODEL, Live
from tests.e2e.test_openai_sdk import result

MAX_TOKENS = 160  # a bound on CPU time; every schema below completes well inside it
NAME = {"type": "string", "minLength": 1, "maxLength": 20}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def obj(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    """A closed object schema; every property required unless `required` says otherwise."""
    return {"type": "object", "properties": properties,
            "required": list(properties) if required is None else required, "additionalProperties": False}


def digit(low: int, high: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": low, "maximum": high}


@dataclass(frozen=True)
class Case:
    prompt: str
    schema: dict[str, Any]


PERSON = obj({"name": NAME, "age": digit(0, 120)})
SCHEMAS: dict[str, Case] = {
    "flat": Case("Describe a person named Ana who is 30 years old.", PERSON),
    "enum": Case("What color is the sky on a clear day?",
                 obj({"color": {"type": "string", "enum": ["red", "green", "blue"]}})),
    "boolean": Case("Is Paris a city?", obj({"name": NAME, "is_city": {"type": "boolean"}})),
    "integer_range": Case("Rate pizza from 1 to 5.", obj({"rating": digit(1, 5)})),
    "number": Case("How much does a cup of coffee cost, in dollars?",
                   obj({"price": {"type": "number", "minimum": 0, "maximum": 100}})),
    "string_array": Case("List three fruits.", obj({"fruits": {
        "type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 12},
        "minItems": 2, "maxItems": 3}})),
    "nested_object": Case("Bob lives in Boston, zip code 02101.", obj({
        "name": NAME, "address": obj({"city": NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})})),
    "array_of_objects": Case("A shopping list: two eggs and one milk.", obj({"items": {
        "type": "array", "minItems": 1, "maxItems": 3,
        "items": obj({"name": {"type": "string", "minLength": 1, "maxLength": 12}, "qty": digit(1, 9)})}})),
    "optional_fields": Case("Name a famous book.", obj(
        {"title": NAME, "author": NAME, "year": digit(1000, 2030)}, required=["title"])),
    "nullable": Case("Describe a cat that has no nickname.", obj({
        "name": NAME, "nickname": {"anyOf": [{"type": "string", "maxLength": 10}, {"type": "null"}]}})),
    "refs": Case("A line from the point (1, 2) to the point (3, 4).", {
        "$defs": {"point": obj({"x": digit(0, 9), "y": digit(0, 9)})},
        **obj({"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}})}),
    "nested_arrays": Case("The 2 by 2 identity matrix.", obj({"rows": {
        "type": "array", "minItems": 2, "maxItems": 2,
        "items": {"type": "array", "minItems": 2, "maxItems": 2, "items": digit(0, 9)}}})),
    "top_level_array": Case("The first four prime numbers.", {
        "type": "array", "items": digit(0, 99), "minItems": 1, "maxItems": 4}),
    "const_and_int_enum": Case("Pick a level from 1 to 3.", obj({
        "version": {"const": 1}, "level": {"enum": [1, 2, 3]}})),
}


def json_schema_format(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def messages(prompt: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": prompt}]


def assert_compact(text: str) -> None:
    """No whitespace outside string literals: the server's grammar allows none."""
    assert not re.search(r"\s", _STRING.sub('""', text)), f"not compact JSON: {text!r}"


def assert_valid(text: str | None, schema: dict[str, Any]) -> Any:
    """`text` is compact JSON valid against `schema`; returns the value."""
    assert isinstance(text, str), text
    value = json.loads(text)
    jsonschema.validate(value, schema, cls=jsonschema.Draft202012Validator)
    assert_compact(text)
    return value


# vLLM's extras: (endpoint, structured_outputs, prompt, max_tokens, check of the text)
Check = Callable[[str], bool]
LARK = 'start: "The answer is " NUMBER "."\nNUMBER: /[0-9]{1,3}/'
GBNF = 'root ::= ("yes" | "no") "!"'
EXTRAS: dict[str, tuple[str, dict[str, Any], str, int, Check]] = {
    "chat_regex": ("chat", {"regex": "[0-9]{3}-[0-9]{4}"}, "Give me a phone number.", 24,
                   lambda t: re.fullmatch(r"[0-9]{3}-[0-9]{4}", t) is not None),
    "chat_choice": ("chat", {"choice": ["yes", "no", "maybe"]}, "Is the sky blue?", 8,
                    lambda t: t in ("yes", "no", "maybe")),
    "chat_json": ("chat", {"json": PERSON}, "Describe a person named Ana who is 30 years old.", MAX_TOKENS,
                  lambda t: assert_valid(t, PERSON) is not None),
    "chat_lark": ("chat", {"grammar": LARK}, "What is 2 + 2?", 24,
                  lambda t: re.fullmatch(r"The answer is [0-9]{1,3}\.", t) is not None),
    "chat_gbnf": ("chat", {"grammar": GBNF}, "Is water wet?", 8, lambda t: t in ("yes!", "no!")),
    "completion_regex": ("completion", {"regex": "[0-9]{3}-[0-9]{4}"}, "My phone number is ", 24,
                         lambda t: re.fullmatch(r"[0-9]{3}-[0-9]{4}", t) is not None),
    "completion_choice": ("completion", {"choice": [" blue", " green"]}, "The sky is", 8,
                          lambda t: t in (" blue", " green")),
    "completion_json": ("completion", {"json": PERSON}, "A person as JSON: ", MAX_TOKENS,
                        lambda t: assert_valid(t, PERSON) is not None),
    "completion_lark": ("completion", {"grammar": LARK}, "Q: What is 2 + 2?\nA: ", 24,
                        lambda t: re.fullmatch(r"The answer is [0-9]{1,3}\.", t) is not None),
    "completion_gbnf": ("completion", {"grammar": GBNF}, "Q: Is water wet?\nA: ", 8,
                        lambda t: t in ("yes!", "no!")),
}


@pytest.fixture(scope="module")
def client(server: Live) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{server.url}/v1", api_key=server.key, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def runs(server: Live) -> dict[str, Any]:
    """The parametrized schema and extras requests, all at once so the engine batches them (CPU is slow)."""

    async def main() -> dict[str, Any]:
        async with AsyncOpenAI(base_url=f"{server.url}/v1", api_key=server.key, max_retries=0,
                               timeout=300) as c:
            jobs: dict[str, Awaitable[Any]] = {
                f"schema:{name}": c.chat.completions.create(
                    model=MODEL, messages=messages(case.prompt),  # type: ignore[arg-type]
                    response_format=json_schema_format(name, case.schema),  # type: ignore[arg-type]
                    temperature=0, max_tokens=MAX_TOKENS)
                for name, case in SCHEMAS.items()
            }
            for name, (endpoint, extra, prompt, max_tokens, _) in EXTRAS.items():
                body = {"structured_outputs": extra}
                if endpoint == "chat":
                    jobs[f"extra:{name}"] = c.chat.completions.create(
                        model=MODEL, messages=[{"role": "user", "content": prompt}], temperature=0,
                        max_tokens=max_tokens, extra_body=body)
                else:
                    jobs[f"extra:{name}"] = c.completions.create(
                        model=MODEL, prompt=prompt, temperature=0, max_tokens=max_tokens, extra_body=body)
            results = await asyncio.gather(*jobs.values(), return_exceptions=True)
            return dict(zip(jobs, results, strict=True))

    return asyncio.run(main())




# -- response_format ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema(runs: dict[str, Any], name: str) -> None:
    """Strict json_schema: compact JSON valid against the schema, ended by the grammar ("stop")."""
    r = result(runs, f"schema:{name}")
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice
    assert choice.message.tool_calls is None or choice.message.tool_calls == []
    assert_valid(choice.message.content, SCHEMAS[name].schema)
    assert 0 < r.usage.completion_tokens <= MAX_TOKENS


def test_json_schema_optional_field_can_be_left_out_or_in(runs: dict[str, Any]) -> None:
    """The optional fields' output is valid either way; an unknown key never appears (closed object)."""
    value = json.loads(result(runs, "schema:optional_fields").choices[0].message.content)
    assert "title" in value and set(value) <= {"title", "author", "year"}


def test_json_schema_streamed_matches_non_streamed(client: OpenAI) -> None:
    """Greedy: the streamed pieces join into the same JSON as the non-streamed answer."""
    case = SCHEMAS["array_of_objects"]
    kw: dict[str, Any] = {"model": MODEL, "messages": messages(case.prompt), "temperature": 0,
                          "max_tokens": MAX_TOKENS,
                          "response_format": json_schema_format("shopping", case.schema)}
    whole = client.chat.completions.create(**kw)
    pieces, finish, usage = [], None, None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    text = "".join(pieces)
    assert finish == whole.choices[0].finish_reason == "stop"
    assert text == whole.choices[0].message.content
    assert_valid(text, case.schema)
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    assert len([p for p in pieces if p]) > 1  # it did stream, in more than one piece


def test_json_object(client: OpenAI) -> None:
    """json_object: one compact JSON object, ended by the grammar.

    json_object bounds nothing: this prompt (with the system message) is one the model answers briefly.
    """
    r = client.chat.completions.create(
        model=MODEL, messages=messages("Describe a cat in a few words."),  # type: ignore[arg-type]
        response_format={"type": "json_object"}, temperature=0, max_tokens=MAX_TOKENS)
    assert r.choices[0].finish_reason == "stop", r.choices[0]
    assert isinstance(assert_valid(r.choices[0].message.content, {"type": "object"}), dict)


def test_response_format_text_is_plain(client: OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi."}],
                                       response_format={"type": "text"}, temperature=0, max_tokens=8)
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")


# -- vLLM's structured_outputs --------------------------------------------------------------------
@pytest.mark.parametrize("name", list(EXTRAS))
def test_structured_outputs_extra(runs: dict[str, Any], name: str) -> None:
    """extra_body structured_outputs (regex, choice, json, Lark and GBNF) on chat and completions."""
    endpoint, _, _, max_tokens, check = EXTRAS[name]
    r = result(runs, f"extra:{name}")
    choice = r.choices[0]
    text = choice.message.content if endpoint == "chat" else choice.text
    assert choice.finish_reason == "stop", choice
    assert check(text), text
    assert r.usage.completion_tokens <= max_tokens


# -- the SDK's helpers: parse() and stream() with pydantic models ---------------------------------
class Person(BaseModel):
    name: str = Field(min_length=1, max_length=20)
    age: int = Field(ge=0, le=120)


class Item(BaseModel):
    name: str = Field(min_length=1, max_length=12)
    quantity: int = Field(ge=1, le=9)


class Order(BaseModel):
    customer: str = Field(min_length=1, max_length=20)
    items: list[Item] = Field(min_length=1, max_length=3)
    express: bool
    size: Literal["small", "large"]


@pytest.mark.parametrize(("model", "prompt"), [
    (Person, "Describe a person named Ana who is 30 years old."),
    (Order, "Ana orders two apples, small, express delivery."),
])
def test_parse(client: OpenAI, model: type[BaseModel], prompt: str) -> None:
    """chat.completions.parse: message.parsed is an instance of the pydantic model."""
    r = client.chat.completions.parse(model=MODEL, messages=messages(prompt),  # type: ignore[arg-type]
                                      response_format=model, temperature=0, max_tokens=MAX_TOKENS)
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, model), message
    assert message.refusal is None
    assert model.model_validate_json(message.content or "") == message.parsed
    assert_compact(message.content or "")


def _stream_helper(client: OpenAI) -> Callable[..., Any]:
    """chat.completions.stream where this SDK has it, else the older beta.chat.completions.stream."""
    stream = getattr(client.chat.completions, "stream", None)
    return stream if stream is not None else client.beta.chat.completions.stream  # type: ignore[attr-defined]


def test_stream_helper_parses(client: OpenAI) -> None:
    """The SDK's stream(): content deltas join into the final content, parsed into the model."""
    deltas, done = [], []
    with _stream_helper(client)(model=MODEL, messages=messages("Describe a person named Bo, aged 41."),
                                response_format=Person, temperature=0, max_tokens=MAX_TOKENS) as stream:
        for event in stream:
            if event.type == "content.delta":
                deltas.append(event.delta)
            elif event.type == "content.done":
                done.append(event.parsed)
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "stop"
    assert "".join(deltas) == choice.message.content and len([d for d in deltas if d]) > 1
    assert isinstance(choice.message.parsed, Person)
    assert done == [choice.message.parsed]


# -- errors ---------------------------------------------------------------------------------------
MISSING_REF = {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}
ERRORS: dict[str, tuple[str, dict[str, Any], str]] = {  # endpoint, request fields, what the message says
    "schema_missing_ref": ("chat", {"response_format": json_schema_format("broken", MISSING_REF)},
                           "$defs/missing"),
    "extra_json_missing_ref": ("chat", {"extra_body": {"structured_outputs": {"json": MISSING_REF}}},
                               "$defs/missing"),
    "chat_bad_regex": ("chat", {"extra_body": {"structured_outputs": {"regex": "[0-9"}}}, "regex"),
    "completion_bad_regex": ("completion", {"extra_body": {"structured_outputs": {"regex": "(ab"}}}, "regex"),
    "bad_grammar": ("chat", {"extra_body": {"structured_outputs": {"grammar": "start: undefined_rule"}}},
                    "grammar"),
    "json_schema_without_schema": ("chat", {"response_format": {"type": "json_schema"}}, "json_schema"),
    "unknown_format_type": ("chat", {"response_format": {"type": "yaml"}}, "response_format"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_uncompilable_constraint_is_a_400(client: OpenAI, name: str) -> None:
    """A constraint that cannot be compiled is the client's error (400), and the message says why."""
    endpoint, fields, says = ERRORS[name]
    with pytest.raises(openai.BadRequestError) as e:
        if endpoint == "chat":
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=4, **fields)
        else:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=4, **fields)
    assert e.value.status_code == 400
    assert says.lower() in str(e.value).lower(), str(e.value)


UNSUPPORTED: dict[str, Any] = {
    "audio": {"voice": "alloy", "format": "wav"},
    "prediction": {"type": "content", "content": "Hello there"},
    "web_search_options": {},
    "functions": [{"name": "f", "parameters": {"type": "object", "properties": {}}}],
    "store": True,
}


@pytest.mark.parametrize("field", list(UNSUPPORTED))
def test_unsupported_openai_field_is_a_400(client: OpenAI, field: str) -> None:
    """An OpenAI field the server cannot honour is refused, naming the field, never silently ignored."""
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=4, extra_body={field: UNSUPPORTED[field]})
    assert e.value.status_code == 400 and field in str(e.value), str(e.value)


@pytest.mark.parametrize("endpoint", ["chat", "completion"])
def test_unknown_field_is_a_400(client: OpenAI, endpoint: str) -> None:
    body = {"frobnicate_level": 3}
    with pytest.raises(openai.BadRequestError) as e:
        if endpoint == "chat":
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=4, extra_body=body)
        else:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=4, extra_body=body)
    assert e.value.status_code == 400 and "frobnicate_level" in str(e.value), str(e.value)


# -- content parts --------------------------------------------------------------------------------
def test_text_content_parts(client: OpenAI) -> None:
    """Message content as a list of text parts, also together with a json_schema constraint."""
    parts = [{"type": "text", "text": "Describe a person named Ana"}, {"type": "text", "text": ", aged 30."}]
    system = [{"type": "text", "text": "Answer in JSON."}]
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": system},  # type: ignore[list-item]
                               {"role": "user", "content": parts}],
        response_format=json_schema_format("person", PERSON), temperature=0, max_tokens=MAX_TOKENS)
    assert r.choices[0].finish_reason == "stop"
    assert_valid(r.choices[0].message.content, PERSON)
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}],  # type: ignore[list-item]
                                           temperature=0, max_tokens=8)
    assert isinstance(plain.choices[0].message.content, str) and plain.choices[0].message.content
