"""Tool calling in tools.py: the streaming call parser, plan_tools, the call grammar, the message rewrite.

The parser and plan tests are pure; the grammar tests compile with the engine's own GrammarCompiler on the
embedded SmolLM2 tokenizer and generate under the grammar with an LLMEngine on the embedded model.
"""

from __future__ import annotations

import json
import random
from typing import Any

import jsonschema
import pytest

from llamaserve.config import EngineConfig
from llamaserve.engine.llm_engine import LLMEngine
from llamaserve.engine.sampling_params import SamplingParams, StructuredOutput
from llamaserve.engine.structured import Grammar, GrammarCompiler
from llamaserve.server.protocol import ChatCompletionRequest, DeltaToolCall
from llamaserve.server.tools import ToolCallParser, ToolPlan, chat_messages, plan_tools

# -- the parser -----------------------------------------------------------------------------------


def assemble(parser: ToolCallParser, pieces: list[str]) -> tuple[str, list[dict[str, Any]],
                                                                list[list[DeltaToolCall]]]:
    """Feed pieces; (content, calls as {id, name, arguments}, the deltas of each feed)."""
    content = ""
    calls: list[dict[str, Any]] = []
    per_feed = []
    for piece in pieces:
        text, deltas = parser.feed(piece)
        content += text
        per_feed.append(deltas)
        for d in deltas:
            if d.index == len(calls):  # a new call: its first delta carries id, type and name
                assert d.id and d.id.startswith("call_"), d
                assert d.type == "function"
                assert d.function.name, d
                calls.append({"id": d.id, "name": d.function.name, "arguments": d.function.arguments or ""})
                continue
            assert d.index == len(calls) - 1, (d, calls)  # deltas never go back to an earlier call
            assert d.id is None and d.type is None and d.function.name is None, d  # id, name: once
            calls[d.index]["arguments"] += d.function.arguments or ""
    assert parser.num_calls == len(calls)
    return content, calls, per_feed


def chunkings(text: str, seed: int, count: int = 8) -> list[list[str]]:
    """Whole, one character at a time, and `count` random seeded splits (pieces of 1..7 characters)."""
    rng = random.Random(seed)
    out = [[text], list(text)]
    for _ in range(count):
        pieces, i = [], 0
        while i < len(text):
            k = rng.randint(1, 7)
            pieces.append(text[i:i + k])
            i += k
        out.append(pieces)
    return out


GENERIC_CASES = {
    "one call": (
        '{"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris"}}]}',
        [("get_weather", {"city": "Paris"})],
    ),
    "two calls": (
        '{"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris","unit":"celsius"}},'
        '{"name":"get_time","arguments":{"city":"Tokyo"}}]}',
        [("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"city": "Tokyo"})],
    ),
    "escaped quotes and backslashes": (
        '{"tool_calls":[{"name":"say","arguments":{"text":"he said \\"hi\\" \\\\","n":1}}]}',
        [("say", {"text": 'he said "hi" \\', "n": 1})],
    ),
    "braces and brackets in strings": (
        '{"tool_calls":[{"name":"code","arguments":{"src":"}]} {[ \\"}\\" ]","b":"]"}},'
        '{"name":"code","arguments":{"src":"{\\"tool_calls\\":[{\\"name\\":\\"x\\",\\"arguments\\":"}}]}',
        [("code", {"src": '}]} {[ "}" ]', "b": "]"}),
         ("code", {"src": '{"tool_calls":[{"name":"x","arguments":'})],
    ),
    "nested objects and arrays": (
        '{"tool_calls":[{"name":"pack","arguments":{"items":[{"k":[1,[2,{}]]},[]],"o":{"p":{"q":null}},'
        '"e":{}}},{"name":"noop","arguments":{}}]}',
        [("pack", {"items": [{"k": [1, [2, {}]]}, []], "o": {"p": {"q": None}}, "e": {}}), ("noop", {})],
    ),
}

NATIVE_CASES = {
    "one call": (
        '{"name":"get_weather","parameters":{"city":"Paris"}}',
        [("get_weather", {"city": "Paris"})],
    ),
    "two calls joined by ;": (
        '{"name":"get_weather","parameters":{"city":"Paris"}};{"name":"get_time","parameters":'
        '{"city":"To;k}yo","tz":["a",{"b":"]"}]}}',
        [("get_weather", {"city": "Paris"}), ("get_time", {"city": "To;k}yo", "tz": ["a", {"b": "]"}]})],
    ),
    "escaped quote and empty arguments": (
        '{"name":"say","parameters":{"t":"\\"{"}};{"name":"noop","parameters":{}}',
        [("say", {"t": '"{'}), ("noop", {})],
    ),
}


@pytest.mark.parametrize(("native", "text", "expected"),
                         [(False, *case) for case in GENERIC_CASES.values()]
                         + [(True, *case) for case in NATIVE_CASES.values()],
                         ids=[f"generic-{k}" for k in GENERIC_CASES] + [f"native-{k}" for k in NATIVE_CASES])
def test_parser_assembles_the_same_calls_however_the_text_is_chunked(
        native: bool, text: str, expected: list[tuple[str, dict]]) -> None:
    reference = None
    for i, pieces in enumerate(chunkings(text, seed=len(text))):
        assert "".join(pieces) == text
        content, calls, _ = assemble(ToolCallParser(native), pieces)
        assert content == "", pieces
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == expected, (i, pieces)
        shape = [(c["name"], c["arguments"]) for c in calls]  # byte-identical argument text too
        assert reference is None or shape == reference, pieces
        reference = shape
        assert len({c["id"] for c in calls}) == len(calls)  # each call its own id


def test_parser_arguments_are_the_exact_json_text_of_the_model() -> None:
    text = '{"tool_calls":[{"name":"f","arguments":{"a":[1,2],"b":"x y"}}]}'
    _, calls, _ = assemble(ToolCallParser(False), [text])
    assert calls[0]["arguments"] == '{"a":[1,2],"b":"x y"}'


def test_parser_streams_arguments_as_they_arrive_and_names_a_call_once_its_head_is_complete() -> None:
    parser = ToolCallParser(False)
    assert parser.feed('{"tool_calls":[{"name":"get_wea') == ("", [])  # no call yet: the name may go on
    _, deltas = parser.feed('ther","argu')
    assert deltas == []
    _, deltas = parser.feed('ments":{"ci')
    assert [(d.index, d.function.name, d.function.arguments) for d in deltas] == [
        (0, "get_weather", ""), (0, None, '{"ci')]
    _, deltas = parser.feed('ty":"Paris"}}]}')
    assert [(d.index, d.function.name, d.function.arguments) for d in deltas] == [(0, None, 'ty":"Paris"}')]
    assert parser.feed("") == ("", [])


def test_parser_splits_a_feed_that_ends_one_call_and_starts_the_next() -> None:
    parser = ToolCallParser(True)
    parser.feed('{"name":"a","parameters":{"x":')
    _, deltas = parser.feed('1}};{"name":"b","parameters":{"y":2')
    assert [(d.index, d.function.name, d.function.arguments) for d in deltas] == [
        (0, None, "1}"), (1, "b", ""), (1, None, '{"y":2')]


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("pieces", [
    ["Hello! ", 'The weather: {"city": "Paris"} ', "[ok]"],
    ["", "I cannot", ' call {"tool_calls":[{"name":"f","arguments":{}}]}'],
    list("No {tools} needed."),
])
def test_text_that_does_not_start_with_a_brace_passes_through_as_content(native: bool,
                                                                          pieces: list[str]) -> None:
    content, calls, _ = assemble(ToolCallParser(native), pieces)
    assert content == "".join(pieces)
    assert calls == []


# -- plan_tools -----------------------------------------------------------------------------------

CITY = {"type": "string", "minLength": 1, "maxLength": 20}


def function(name: str, properties: dict[str, Any], description: str = "") -> dict[str, Any]:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": list(properties),
                       "additionalProperties": False}}}


WEATHER = function("get_weather", {"city": CITY, "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "Get the current weather in a city.")
TIME = function("get_time", {"city": CITY}, "Get the local time in a city.")
TOOLS = [WEATHER, TIME]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def request(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": ASK} | fields)


def test_plan_without_tools_is_none() -> None:
    assert plan_tools(request(), "t") is None
    assert plan_tools(request(tool_choice="none"), "t") is None
    assert plan_tools(request(tools=[]), "t") is None


def test_plan_with_tool_choice_none_is_none_even_with_a_response_format() -> None:
    assert plan_tools(request(tools=TOOLS, tool_choice="none"), None) is None
    assert plan_tools(request(tools=TOOLS, tool_choice="none", response_format={"type": "json_object"}),
                      None) is None


@pytest.mark.parametrize("choice", ["auto", "required", {"type": "function", "function": {"name": "f"}}])
def test_tool_choice_without_tools_is_refused(choice: Any) -> None:
    with pytest.raises(ValueError, match="tool_choice needs 'tools'"):
        plan_tools(request(tool_choice=choice), None)


def test_named_function_not_in_tools_is_refused() -> None:
    with pytest.raises(ValueError, match="'get_stock'"):
        plan_tools(request(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_stock"}}),
                   None)


def test_duplicate_function_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unique"):
        plan_tools(request(tools=[WEATHER, TIME, WEATHER]), None)


@pytest.mark.parametrize("extra", [
    {"response_format": {"type": "json_object"}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}},
    {"structured_outputs": {"regex": "[a-z]+"}},
    {"guided_choice": ["a", "b"]},
])
def test_tools_with_another_output_constraint_are_refused(extra: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="cannot be combined with tools"):
        plan_tools(request(tools=TOOLS, tool_choice="required", **extra), None)


def test_tools_with_a_text_response_format_are_fine() -> None:
    plan = plan_tools(request(tools=TOOLS, response_format={"type": "text"}), None)
    assert plan is not None and plan.choice == "auto"


def test_plan_fields() -> None:
    plan = plan_tools(request(tools=TOOLS), "{{ messages }}")
    assert plan is not None
    assert (plan.choice, plan.parallel, plan.native, plan.args_key) == ("auto", True, False, "arguments")
    assert plan.tools == TOOLS  # OpenAI's tool objects, as given (no None fields added)
    plan = plan_tools(request(tools=TOOLS, tool_choice="required", parallel_tool_calls=False), None)
    assert plan is not None and (plan.choice, plan.parallel, plan.native) == ("required", False, False)
    plan = plan_tools(request(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}},
                              parallel_tool_calls=True), None)
    assert plan is not None and (plan.choice, plan.parallel) == ("get_time", True)


@pytest.mark.parametrize(("template", "native"), [
    (None, False),
    ("{% for m in messages %}{{ m.content }}{% endfor %}", False),
    ("{% if tools %}{{ tools | tojson }}{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}", True),
])
def test_native_format_when_the_template_renders_tools(template: str | None, native: bool) -> None:
    plan = plan_tools(request(tools=TOOLS), template)
    assert plan is not None and plan.native is native
    assert plan.args_key == ("parameters" if native else "arguments")


def test_generic_system_prompt_lists_the_tools_and_the_format() -> None:
    for choice, must in [("auto", "plain text"), ("required", "must call at least one"),
                         ("get_time", "must call get_time")]:
        prompt = ToolPlan(TOOLS, choice, True, False).system_prompt()
        assert must in prompt
        listed = json.loads(prompt.split("You can call these functions: ")[1].split("\n")[0])
        assert [f["name"] for f in listed] == ["get_weather", "get_time"]
        assert listed[0]["parameters"] == PARAMETERS["get_weather"]
        assert '{"tool_calls": [{"name": "<function>", "arguments":' in prompt


# -- the grammar, with the engine's compiler and model ----------------------------------------------


@pytest.fixture(scope="module")
def engine(smollm_parts) -> LLMEngine:
    model, tokenizer = smollm_parts
    return LLMEngine(model, tokenizer, EngineConfig(kv_cache_memory=0.25, max_num_seqs=8))


@pytest.fixture(scope="module")
def compiler(smollm_parts) -> GrammarCompiler:
    _, tok = smollm_parts
    return GrammarCompiler(tok.hf, tok.vocab_size, tok.eos_token_ids)


def accepts(grammar: Grammar, text: str, tokenizer: Any) -> tuple[bool, bool]:
    """(every token of `text` accepted, the grammar complete after them)."""
    state = grammar.start()
    for t in tokenizer.encode(text, add_special_tokens=False):
        if not state.accept(t):
            return False, False
    return True, state.done


PLANS = [ToolPlan(TOOLS, choice, parallel, native) for native in (False, True)
         for choice in ("auto", "required", "get_time") for parallel in (False, True)]


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"{'native' if p.native else 'generic'}-{p.choice}-"
                                                    f"{'parallel' if p.parallel else 'single'}")
def test_every_tool_grammar_compiles_and_admits_exactly_the_allowed_calls(
        compiler: GrammarCompiler, smollm_parts, plan: ToolPlan) -> None:
    _, tok = smollm_parts
    spec = plan.grammar()
    assert isinstance(spec, StructuredOutput) and spec.kind == "grammar"
    grammar = compiler.compile(spec)
    key = plan.args_key
    weather = json.dumps({"name": "get_weather", key: {"city": "Paris", "unit": "celsius"}},
                         separators=(",", ":"))
    time_ = json.dumps({"name": "get_time", key: {"city": "Tokyo"}}, separators=(",", ":"))

    def calls(*objs: str) -> str:
        return ";".join(objs) if plan.native else '{"tool_calls":[' + ",".join(objs) + "]}"

    weather_ok = plan.choice != "get_time"
    several = plan.parallel and plan.choice in ("auto", "required")  # a named function: called once
    complete = not (plan.native and several)  # native parallel calls may go on with ";" (or EOS)
    assert accepts(grammar, calls(weather), tok) == ((True, complete) if weather_ok else (False, False))
    assert accepts(grammar, calls(time_), tok)[0]
    ok, _ = accepts(grammar, calls(time_, time_), tok)
    assert ok is several  # a second call only with parallel_tool_calls, and not of a named function
    # Arguments that break the function's schema, or a function that does not exist: never.
    bad_args = json.dumps({"name": "get_time", key: {"city": "Tokyo", "extra": 1}}, separators=(",", ":"))
    unknown = json.dumps({"name": "get_stock", key: {}}, separators=(",", ":"))
    assert not accepts(grammar, calls(bad_args), tok)[0]
    assert not accepts(grammar, calls(unknown), tok)[0]
    # The other format's calls are refused.
    other_key = "arguments" if plan.native else "parameters"
    other = json.dumps({"name": "get_time", other_key: {"city": "Tokyo"}}, separators=(",", ":"))
    assert not accepts(grammar, calls(other), tok)[0]
    # Plain text only under "auto".
    assert accepts(grammar, "It is sunny in Paris.", tok)[0] is (plan.choice == "auto")


def generate(engine: LLMEngine, plan: ToolPlan, question: str, max_tokens: int = 80) -> tuple[str, str]:
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": question}]})
    ids = engine.tokenizer.encode_chat(chat_messages(req, plan, engine.tokenizer.chat_template),
                                       tools=plan.tools if plan.native else None)
    rid = f"tools-{len(question)}-{plan.native}-{plan.parallel}-{plan.choice}"
    engine.add_request(rid, ids, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                structured=plan.grammar()))
    text, reason = "", None
    while engine.has_unfinished:
        for out in engine.step():
            for c in out.outputs:
                text += c.text
                reason = c.finish_reason or reason
    assert reason is not None
    return text, reason


def parsed_calls(plan: ToolPlan, text: str) -> list[dict[str, Any]]:
    content, calls, _ = assemble(ToolCallParser(plan.native), chunkings(text, seed=1, count=1)[-1])
    assert content == ""
    for c in calls:
        args = json.loads(c["arguments"])
        jsonschema.validate(args, PARAMETERS[c["name"]], cls=jsonschema.Draft202012Validator)
    return calls


@pytest.mark.parametrize("native", [False, True], ids=["generic", "native"])
def test_generation_under_the_required_grammar_yields_valid_calls(engine: LLMEngine, native: bool) -> None:
    plan = ToolPlan(TOOLS, "required", False, native)
    text, reason = generate(engine, plan, "What is the weather in Paris, and what time is it in Tokyo?")
    assert reason == "stop", text  # the grammar completed (not cut at max_tokens)
    value = json.loads(text)  # a single call: one JSON value in either format
    if native:
        assert set(value) == {"name", "parameters"}, text
    else:
        assert set(value) == {"tool_calls"} and len(value["tool_calls"]) == 1, text
        assert set(value["tool_calls"][0]) == {"name", "arguments"}
    calls = parsed_calls(plan, text)
    assert len(calls) == 1  # parallel False: at most one call
    assert calls[0]["name"] in PARAMETERS


def test_generation_for_a_named_function_calls_it(engine: LLMEngine) -> None:
    # parallel_tool_calls does not matter: a named function is called once (SmolLM2-135M would repeat
    # the call until max_tokens otherwise).
    plan = ToolPlan(TOOLS, "get_time", True, False)
    text, reason = generate(engine, plan, "What is the weather in Paris?")
    assert reason == "stop", text
    calls = parsed_calls(plan, text)
    assert [c["name"] for c in calls] == ["get_time"]


# -- chat_messages --------------------------------------------------------------------------------

NATIVE_TEMPLATE = "{% if tools %}{{ tools }}{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}"
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18C and sunny"},
]


def test_generic_history_puts_calls_in_json_content_and_results_in_user_messages() -> None:
    req = request(messages=HISTORY, tools=TOOLS)
    plan = plan_tools(req, None)
    assert plan is not None and not plan.native
    out = chat_messages(req, plan, None)
    assert out[0] == {"role": "system", "content": plan.system_prompt()}
    assert out[1] == {"role": "user", "content": "Weather in Paris?"}
    assert out[2]["role"] == "assistant" and "tool_calls" not in out[2]
    assert json.loads(out[2]["content"]) == {"tool_calls": [{"name": "get_weather",
                                                              "arguments": {"city": "Paris"}}]}
    assert out[3] == {"role": "user", "content": "Function result (get_weather): 18C and sunny"}
    assert len(out) == 4


def test_generic_history_keeps_the_text_beside_calls_and_names_unknown_results_by_id() -> None:
    messages = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Let me check.", "tool_calls": [
                    {"id": "a", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
                    {"id": "b", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
                {"role": "tool", "tool_call_id": "b", "content": "cold"},
                {"role": "tool", "tool_call_id": "zzz", "content": "?"}]
    out = chat_messages(request(messages=messages), None, None)  # no plan: no system prompt, same rewrite
    assert out[0] == {"role": "user", "content": "Hi"}
    head, _, calls = out[1]["content"].partition("\n")
    assert head == "Let me check."
    assert json.loads(calls) == {"tool_calls": [{"name": "get_time", "arguments": {}},
                                                 {"name": "get_weather", "arguments": {"city": "Oslo"}}]}
    assert out[2]["content"] == "Function result (get_weather): cold"
    assert out[3]["content"] == "Function result (zzz): ?"


@pytest.mark.parametrize("role", ["system", "developer"])
def test_tools_prompt_is_merged_into_an_existing_system_message(role: str) -> None:
    req = request(messages=[{"role": role, "content": "Be brief."}] + ASK, tools=TOOLS,
                  tool_choice="required")
    plan = plan_tools(req, None)
    assert plan is not None
    out = chat_messages(req, plan, None)
    assert [m["role"] for m in out] == ["system", "user"]
    assert out[0]["content"] == "Be brief.\n\n" + plan.system_prompt()


def test_native_history_keeps_tool_calls_with_dict_arguments_and_tool_call_ids() -> None:
    req = request(messages=HISTORY, tools=TOOLS)
    plan = plan_tools(req, NATIVE_TEMPLATE)
    assert plan is not None and plan.native
    out = chat_messages(req, plan, NATIVE_TEMPLATE)
    assert [m["role"] for m in out] == ["user", "assistant", "tool"]  # no tools system prompt
    assert out[1]["tool_calls"] == [{"id": "call_1", "type": "function",
                                     "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert out[1]["content"] == ""
    assert out[2] == {"role": "tool", "content": "18C and sunny", "tool_call_id": "call_1"}


@pytest.mark.parametrize("template", [None, NATIVE_TEMPLATE])
def test_history_arguments_that_are_not_json_are_replayed_as_they_were(template: str | None) -> None:
    def calls(arguments: str) -> Any:
        messages = [HISTORY[0], {"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]}]
        out = chat_messages(request(messages=messages), None, template)[1]
        if template is None:
            return json.loads(out["content"])["tool_calls"][0]["arguments"]
        return out["tool_calls"][0]["function"]["arguments"]

    assert calls("{city: Paris") == "{city: Paris"
    assert calls("") == {} and calls("  ") == {}
    assert calls('{"city": "Paris"}') == {"city": "Paris"}
