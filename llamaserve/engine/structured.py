"""Structured output on llguidance: grammars compiled once per spec, token masks per sequence per step."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import llguidance
import llguidance.hf
import numpy as np
import torch
from llguidance.gbnf_to_lark import any_to_lark

from llamaserve.engine.sampling_params import StructuredOutput

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

# Compact JSON (no free whitespace): a small model given a choice of whitespace can loop on it forever.
JSON_OPTIONS = cast("JsonCompileOptions", {"whitespace_flexible": False})
_CACHE_SIZE = 128  # compiled grammars kept, least recently used dropped first


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
               "unevaluatedProperties", "additionalItems")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")


def close_objects(schema: Any, close: bool = True) -> Any:
    """A copy of a JSON schema in which objects that list `properties` and say nothing of other keys
    allow no other keys (as OpenAI's strict mode requires anyway).

    Without it a small model given an open object tends to invent keys (schema words, mostly) until
    max_tokens; the output still validates against the original schema. allOf parts stay open, since
    their properties add up.
    """
    if isinstance(schema, list):  # old-style tuple "items"
        return [close_objects(s, close) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: close_objects(s) for name, s in out[key].items()}
    for key in _SCHEMA_ONE:
        if key in out:
            out[key] = close_objects(out[key])
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [close_objects(s) for s in out[key]]
    if isinstance(out.get("allOf"), list):
        out["allOf"] = [close_objects(s, close=False) for s in out["allOf"]]
    open_ended = ("additionalProperties", "patternProperties", "unevaluatedProperties", "allOf")
    if close and "properties" in out and not any(k in out for k in open_ended):
        out["additionalProperties"] = False
    return out


def grammar_text(spec: StructuredOutput) -> str:
    """The llguidance grammar for a spec; ValueError for a spec that is not even well formed."""
    kind, value = spec.kind, spec.value
    if kind == "json":
        try:
            schema = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict | bool):
            raise ValueError("a JSON schema must be an object (or true/false)")
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(close_objects(schema)),
                                                             defaults=JSON_OPTIONS)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(value)
    if kind == "choice":
        try:
            choices = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"the choice list is not valid JSON: {e}") from None
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise ValueError("the choice list must be a non-empty JSON list of strings")
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
    try:  # Lark as it is; GBNF (llama.cpp's and xgrammar's EBNF, "root ::= ...") converted to Lark
        return llguidance.LLMatcher.grammar_from_lark(any_to_lark(value))
    except Exception as e:  # the GBNF converter raises its own exception types for syntax errors
        raise ValueError(f"the grammar does not parse: {e}") from None


@dataclass(slots=True)
class Grammar:
    """A compiled grammar: the pristine matcher that each sequence copies."""

    matcher: llguidance.LLMatcher

    def start(self) -> GrammarState:
        return GrammarState(self.matcher.deep_copy())


@dataclass(slots=True)
class GrammarState:
    """One sequence's position in its grammar."""

    matcher: llguidance.LLMatcher

    def accept(self, token: int) -> bool:
        return bool(self.matcher.consume_token(token))

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more (EOS at most)."""
        return bool(self.matcher.is_stopped())

    @property
    def error(self) -> str:
        return str(self.matcher.get_error())


class GrammarCompiler:
    """Builds llguidance's view of the tokenizer once (about a second) and caches compiled grammars.

    Thread-safe: the server compiles on worker threads, off the event loop and off the engine thread.
    """

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> None:
        self._hf = hf_tokenizer
        self._vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[StructuredOutput, Grammar] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=self._vocab_size,
                                                               eos_token=self._eos)
            return self._tokenizer

    def compile(self, spec: StructuredOutput) -> Grammar:
        """The grammar of `spec`, from the cache or compiled now; ValueError saying why it cannot be."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        matcher = llguidance.LLMatcher(self.tokenizer, grammar_text(spec), log_level=0)
        if matcher.is_error():
            raise ValueError(f"the {spec.describe()} cannot be compiled: {matcher.get_error()}")
        grammar = Grammar(matcher)
        with self._lock:
            self._cache[spec] = grammar
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar

    def apply_masks(self, logits: torch.Tensor, states: list[tuple[int, GrammarState]]) -> None:
        """Set to -inf, in place, every token that row r's grammar forbids; logits: [B, V] float32.

        One bitmask row per state (llguidance caches masks per lexer state: ~5 us a row here, so a plain
        loop beats its thread pool on a few cores), then one batched fill over the rows.
        """
        vocab = self.tokenizer.vocab_size
        words = (vocab + 31) // 32
        masks = np.zeros((len(states), words), dtype=np.uint32)  # [R, W] bit set = allowed
        for k, (_, state) in enumerate(states):
            state.matcher.unsafe_compute_mask_ptr(masks[k].ctypes.data, words * 4)
        bits = np.unpackbits(masks.view(np.uint8), axis=1, bitorder="little")  # [R, 32W] token order
        width = min(vocab, logits.shape[1])
        allowed = torch.from_numpy(bits[:, :width]).view(torch.bool).to(logits.device)  # [R, width]
        rows = [r for r, _ in states]
        if rows == list(range(logits.shape[0])):  # every row has a grammar: mask in place
            logits[:, :width].masked_fill_(~allowed, float("-inf"))
            logits[:, width:] = float("-inf")  # ids the grammar's tokenizer does not know
            return
        index = torch.tensor(rows, dtype=torch.long, device=logits.device)
        sub = logits.index_select(0, index)  # [R, V]
        sub[:, :width].masked_fill_(~allowed, float("-inf"))
        sub[:, width:] = float("-inf")
        logits.index_copy_(0, index, sub)
