"""Structured output on the embedded model: JSON schemas, regexes, choices, Lark and GBNF grammars."""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from llamaserve.config import EngineConfig
from llamaserve.engine import structured
from llamaserve.engine.llm_engine import LLMEngine
from llamaserve.engine.sampling_params import SamplingParams, StructuredOutput
from llamaserve.engine.structured import GrammarCompiler, GrammarState

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "nickname": {"type": "string", "maxLength": 10},  # optional
    },
    "required": ["name", "age", "role", "active", "tags", "address"],
    "additionalProperties": False,
}
JSON_SPEC = StructuredOutput("json", json.dumps(SCHEMA))
CODE_REGEX = "[0-9]{3}-[a-z]{2}"  # ASCII classes: llguidance's \d is Unicode
COLORS = ["red", "green", "blue"]
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')  # a JSON string literal


@dataclass(slots=True)
class Choice:
    """One sequence's result, read from the step loop's deltas."""

    token_ids: list[int]
    text: str
    finish_reason: str | None


_ids = itertools.count()


@pytest.fixture(scope="module")
def engine(smollm_parts) -> LLMEngine:
    model, tokenizer = smollm_parts
    return LLMEngine(model, tokenizer, EngineConfig(kv_cache_memory=0.25, max_num_seqs=8))


def chat_ids(engine: LLMEngine, q: str) -> list[int]:
    return engine.tokenizer.encode_chat([{"role": "user", "content": q}])


def run(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[Choice]]:
    """Run requests together through add_request + step(); each request's n choices, in order."""
    rids = [f"structured-{next(_ids)}" for _ in prompts]
    for rid, prompt, p in zip(rids, prompts, params, strict=True):
        engine.add_request(rid, prompt, p)
    got = {rid: [Choice([], "", None) for _ in range(p.n)] for rid, p in zip(rids, params, strict=True)}
    while engine.has_unfinished:
        for out in engine.step():
            for c in out.outputs:
                choice = got[out.request_id][c.index]
                assert choice.finish_reason is None  # nothing arrives after the finishing delta
                choice.token_ids += c.token_ids
                choice.text += c.text
                choice.finish_reason = c.finish_reason
    assert not engine.requests
    assert engine.block_manager.num_free_blocks == engine.num_blocks
    return [got[rid] for rid in rids]


def run_one(engine: LLMEngine, question: str, params: SamplingParams) -> list[Choice]:
    return run(engine, [chat_ids(engine, question)], [params])[0]


def assert_compact(text: str) -> None:
    """No whitespace outside string literals."""
    assert not re.search(r"\s", _STRING.sub('""', text)), text


def validate(value: object) -> None:
    """Check `value` against SCHEMA with jsonschema (a test-only dependency: skip without it)."""
    pytest.importorskip("jsonschema").validate(value, SCHEMA)


def replay(state: GrammarState, tokens: list[int]) -> list[bool]:
    """`done` after each token, fed one by one to `state`."""
    done = []
    for t in tokens:
        assert state.accept(t), state.error
        done.append(state.done)
    return done


def allowed_by_bitmask(state: GrammarState, vocab: int) -> torch.Tensor:
    """[vocab] bool: llguidance's own mask (bit k of 32-bit word w allows token 32 * w + k)."""
    bits = np.unpackbits(np.frombuffer(state.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
    return torch.from_numpy(bits[:vocab].astype(bool))


# -- generation -----------------------------------------------------------------------------------


def test_json_schema_greedy_is_valid_compact_and_stops_at_the_closing_brace(engine: LLMEngine) -> None:
    params = SamplingParams(max_tokens=120, temperature=0.0, structured=JSON_SPEC)
    (out,) = run_one(engine, "Describe a person as a JSON object.", params)
    value = json.loads(out.text)
    validate(value)
    assert_compact(out.text)
    assert out.text.endswith("}")
    assert out.finish_reason == "stop" and len(out.token_ids) < 120
    assert out.token_ids[-1] not in engine.tokenizer.eos_token_ids  # the grammar ended it, not EOS


def test_json_schema_sampled_n3_seeded_every_choice_validates(engine: LLMEngine) -> None:
    params = SamplingParams(n=3, max_tokens=120, temperature=1.0, seed=3, structured=JSON_SPEC)
    outs = run_one(engine, "Describe a person as a JSON object.", params)
    assert len(outs) == 3
    for out in outs:
        assert out.finish_reason == "stop", out.text
        validate(json.loads(out.text))
        assert_compact(out.text)
    assert len({o.text for o in outs}) > 1  # each choice has its own grammar state and its own seed


def test_regex_fully_matches_and_stops_when_complete(engine: LLMEngine) -> None:
    params = SamplingParams(max_tokens=32, temperature=0.0, structured=StructuredOutput("regex", CODE_REGEX))
    (out,) = run_one(engine, "What is the capital of France?", params)
    assert re.fullmatch(CODE_REGEX, out.text), out.text
    assert out.finish_reason == "stop" and len(out.token_ids) < 32
    # It stopped on the very token that completed the grammar, not one later.
    done = replay(engine.grammars.compile(params.structured).start(), out.token_ids)
    assert done[-1] and not any(done[:-1])


def test_open_ended_regex_runs_to_max_tokens(engine: LLMEngine) -> None:
    """A grammar that is never complete does not stop the output; max_tokens does ("length")."""
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True,
                            structured=StructuredOutput("regex", "[0-9]+"))
    (out,) = run_one(engine, "Count to ten.", params)
    assert out.finish_reason == "length" and len(out.token_ids) == 6
    assert re.fullmatch("[0-9]+", out.text), out.text


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_choice_returns_exactly_one_choice(engine: LLMEngine, temperature: float) -> None:
    params = SamplingParams(n=2, max_tokens=16, temperature=temperature, seed=11,
                            structured=StructuredOutput("choice", json.dumps(COLORS)))
    for out in run_one(engine, "What is the capital of France?", params):
        assert out.text in COLORS
        assert out.finish_reason == "stop"


def test_logit_bias_cannot_bring_back_a_forbidden_token(engine: LLMEngine) -> None:
    """The mask comes after the biases: +100 on EOS and on 'Paris' changes nothing the grammar forbids."""
    paris = engine.tokenizer.hf.encode("Paris", add_special_tokens=False)[0]
    bias = {paris: 100.0} | {t: 100.0 for t in engine.tokenizer.eos_token_ids}
    params = SamplingParams(max_tokens=16, temperature=0.0, logit_bias=bias,
                            structured=StructuredOutput("choice", json.dumps(COLORS)))
    (out,) = run_one(engine, "What is the capital of France?", params)
    assert out.text in COLORS and out.finish_reason == "stop"


LARK = 'start: ANSWER " because " WORD\nANSWER: "yes" | "no"\nWORD: /[a-z]{1,8}/'
GBNF = 'root ::= answer " " digit digit\nanswer ::= "yes" | "no"\ndigit ::= [0-9]'


@pytest.mark.parametrize(("grammar", "pattern"), [
    (LARK, "(yes|no) because [a-z]{1,8}"),
    (GBNF, "(yes|no) [0-9]{2}"),
], ids=["lark", "gbnf"])
def test_lark_and_gbnf_grammars_constrain(engine: LLMEngine, grammar: str, pattern: str) -> None:
    params = SamplingParams(max_tokens=24, temperature=0.0, structured=StructuredOutput("grammar", grammar))
    (out,) = run_one(engine, "Is the sky green? Explain.", params)
    assert re.fullmatch(pattern, out.text), out.text
    assert out.finish_reason == "stop"


def test_free_text_batch_mate_is_unchanged_by_a_structured_request(engine: LLMEngine) -> None:
    free_prompt = chat_ids(engine, "Write a haiku about the sea.")
    json_prompt = chat_ids(engine, "Describe a person as a JSON object.")
    free = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    constrained = SamplingParams(max_tokens=16, temperature=0.0, structured=JSON_SPEC)  # masked all along
    (free_alone,) = run(engine, [free_prompt], [free])[0]
    (json_alone,) = run(engine, [json_prompt], [constrained])[0]
    (json_mixed,), (free_mixed,) = run(engine, [json_prompt, free_prompt], [constrained, free])
    assert free_mixed.token_ids == free_alone.token_ids
    assert json_mixed.token_ids == json_alone.token_ids
    assert not re.fullmatch(r"\{.*\}", free_mixed.text, re.S)  # the free text was not constrained


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "message"), [
    (StructuredOutput("regex", "[0-9]+("), r"regex cannot be compiled.*unclosed group"),
    (StructuredOutput("regex", "a{3,1}"), r"regex cannot be compiled.*repetition"),
    (StructuredOutput("json", '{"type": "object", "properties": {"a": {"$ref": "#/$defs/gone"}}}'),
     r"JSON schema cannot be compiled.*/\$defs/gone.*does not exist"),
    (StructuredOutput("json", '{"type": "object", "properties": '), r"JSON schema is not valid JSON"),
    (StructuredOutput("json", "[1, 2]"), r"must be an object"),
    (StructuredOutput("json", '{"type": "strin"}'), r"JSON schema cannot be compiled.*strin"),
    (StructuredOutput("grammar", "start: missing_rule"), r"grammar cannot be compiled.*missing_rule"),
], ids=["regex-group", "regex-range", "dangling-ref", "malformed-json", "json-not-object", "json-bad-type",
        "lark-unknown-rule"])
def test_bad_spec_is_a_value_error_naming_the_problem(engine: LLMEngine, spec: StructuredOutput,
                                                      message: str) -> None:
    with pytest.raises(ValueError, match=re.compile(message, re.S)):
        engine.grammars.compile(spec)
    rid = f"bad-{next(_ids)}"
    with pytest.raises(ValueError, match=re.compile(message, re.S)):
        engine.add_request(rid, [1, 2, 3], SamplingParams(max_tokens=4, structured=spec))
    assert rid not in engine.requests and engine.scheduler.num_waiting == 0  # nothing half-added


def test_unknown_kind_and_empty_value_are_refused() -> None:
    with pytest.raises(ValueError, match=r"kind must be one of json, regex, choice, grammar, got 'xml'"):
        StructuredOutput("xml", "<a/>")
    with pytest.raises(ValueError, match=r"regex must not be empty"):
        StructuredOutput("regex", "")


def test_min_tokens_with_structured_output_is_refused() -> None:
    with pytest.raises(ValueError, match=r"min_tokens cannot be combined with structured output"):
        SamplingParams(max_tokens=8, min_tokens=2, structured=StructuredOutput("regex", "[0-9]+"))
    assert SamplingParams(max_tokens=8, min_tokens=0, structured=StructuredOutput("regex", "[0-9]+"))


@pytest.mark.parametrize("value", ['"abc"', "[]", "[1, 2]"], ids=["string", "empty-list", "not-strings"])
def test_choice_that_is_not_a_non_empty_list_is_refused(engine: LLMEngine, value: str) -> None:
    with pytest.raises(ValueError, match="non-empty JSON list of strings"):
        engine.grammars.compile(StructuredOutput("choice", value))


def test_malformed_choice_list_error_says_what_is_wrong(engine: LLMEngine) -> None:
    with pytest.raises(ValueError, match=r"(?i)choice"):
        engine.grammars.compile(StructuredOutput("choice", '["a", "b"'))


# -- the compiler ---------------------------------------------------------------------------------


def test_compile_cache_returns_the_same_grammar_per_spec(engine: LLMEngine) -> None:
    first = engine.grammars.compile(StructuredOutput("regex", "[a-c]{4}"))
    again = engine.grammars.compile(StructuredOutput("regex", "[a-c]{4}"))  # an equal, distinct spec
    other = engine.grammars.compile(StructuredOutput("regex", "[a-c]{5}"))
    as_choice = engine.grammars.compile(StructuredOutput("choice", '["[a-c]{4}"]'))
    assert again is first
    assert other is not first and as_choice is not first
    # Every start() is a fresh state: advancing one leaves the others and the cached grammar alone.
    a, b = first.start(), first.start()
    assert replay(a, engine.tokenizer.hf.encode("abca", add_special_tokens=False))[-1]
    assert not b.done and not first.start().done
    assert replay(b, engine.tokenizer.hf.encode("cccc", add_special_tokens=False))[-1]


def test_compile_cache_drops_the_least_recently_used(engine: LLMEngine, monkeypatch) -> None:
    monkeypatch.setattr(structured, "_CACHE_SIZE", 2)
    tok = engine.tokenizer
    compiler = GrammarCompiler(tok.hf, tok.vocab_size, tok.eos_token_ids)
    specs = [StructuredOutput("regex", f"[0-9]{{{k}}}") for k in (1, 2, 3)]
    first = compiler.compile(specs[0])
    compiler.compile(specs[1])
    assert compiler.compile(specs[0]) is first  # a hit makes it the most recently used
    compiler.compile(specs[2])  # evicts specs[1]
    assert compiler.compile(specs[0]) is first
    assert len(compiler._cache) == 2 and specs[1] not in compiler._cache


# -- masks ----------------------------------------------------------------------------------------


def _states(engine: LLMEngine) -> list[GrammarState]:
    """Grammar states at different points: inside a JSON string, a fresh regex, a choice half-way."""
    hf = engine.tokenizer.hf
    inside = engine.grammars.compile(JSON_SPEC).start()
    replay(inside, hf.encode('{"name":"Al', add_special_tokens=False))
    digits = engine.grammars.compile(StructuredOutput("regex", CODE_REGEX)).start()
    half = engine.grammars.compile(StructuredOutput("choice", json.dumps(COLORS))).start()
    replay(half, hf.encode("gr", add_special_tokens=False))
    return [inside, digits, half]


def test_apply_masks_forbids_exactly_what_the_grammar_forbids(engine: LLMEngine) -> None:
    vocab = engine.grammars.tokenizer.vocab_size
    states = _states(engine)
    grammar_rows = [0, 2, 3]
    logits = torch.randn(5, vocab + 40, generator=torch.Generator().manual_seed(0))  # 40 padding columns
    before = logits.clone()
    engine.grammars.apply_masks(logits, list(zip(grammar_rows, states, strict=True)))
    for row in (1, 4):
        assert torch.equal(logits[row], before[row])  # rows without a grammar: untouched
    for row, state in zip(grammar_rows, states, strict=True):
        allowed = allowed_by_bitmask(state, vocab)
        assert 0 < int(allowed.sum()) < vocab
        expected = torch.where(allowed, before[row, :vocab], torch.tensor(float("-inf")))
        assert torch.equal(logits[row, :vocab], expected)
        assert torch.isneginf(logits[row, vocab:]).all()  # ids past the grammar's tokenizer
        # Independently of the bitmask: a sample of allowed and forbidden tokens, tried on copies.
        gen = torch.Generator().manual_seed(row)
        ok, no = allowed.nonzero().flatten(), (~allowed).nonzero().flatten()
        for tokens, want in ((ok, 1), (no, 0)):
            for t in tokens[torch.randperm(len(tokens), generator=gen)[:25]].tolist():
                assert state.matcher.deep_copy().try_consume_tokens([t]) == want, (row, t)
    # The masks did not move the states: computing them again gives the same answer.
    again = torch.randn(5, vocab + 40, generator=torch.Generator().manual_seed(0))
    engine.grammars.apply_masks(again, list(zip(grammar_rows, states, strict=True)))
    assert torch.equal(again, logits)


def test_apply_masks_one_row_agrees_with_a_batch(engine: LLMEngine) -> None:
    """One state takes the direct path, several the parallel executor: both give the same rows."""
    vocab = engine.grammars.tokenizer.vocab_size
    states = _states(engine)
    batch = torch.randn(len(states), vocab, generator=torch.Generator().manual_seed(1))
    singles = batch.clone()
    engine.grammars.apply_masks(batch, list(enumerate(states)))
    for row, state in enumerate(states):
        one = singles[row : row + 1]
        engine.grammars.apply_masks(one, [(0, state)])
        assert torch.equal(one[0], batch[row])
    survivors = torch.isfinite(batch[1]).nonzero().flatten().tolist()  # the fresh CODE_REGEX row
    assert survivors and {engine.tokenizer.hf.decode([t])[0] for t in survivors} <= set("0123456789")
