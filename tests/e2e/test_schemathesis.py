"""Schemathesis over the app's OpenAPI schema with all its checks: never a 5xx, every response as
documented, every schema-invalid request refused, every schema-valid request accepted.

Three exceptions, each a refusal whose message names it: what a static schema cannot say, the loaded
model's limits (its context length, the range of its token ids, a prompt that tokenizes to nothing, a
text far longer than the context); rules between fields that the schema states in words, not in
JSON Schema (one structured-output constraint per request; structured output with tools only under
tool_choice "none"; unique tool names): pairwise exclusions written as JSON Schema would make the
published schema unreadable for client generators, and OpenAI's own does not encode them either; and
a string in another language that does not parse or compile in it (a grammar, a regular expression, a
JSON schema or choice list given as text): its syntax is that language's, not JSON Schema's. Any
other refusal of a schema-valid request fails.
`make stress` runs this file with LLAMASERVE_FUZZ_EXAMPLES=100.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance

from llamaserve.config import EngineConfig
from llamaserve.engine.llm_engine import LLMEngine
from llamaserve.server.app import create_app
from llamaserve.server.settings import ServerSettings
from tests.e2e.conftest import Live, started_server

MODEL_LIMITS = re.compile("|".join([
    r"this model's context length is \d+ tokens", r"leaves no room to generate within the context length",
    r"token ids must be in 0\.\.\d+", r"token id \d+ is outside the vocabulary", r"the prompt is empty",
    r"characters, far more than the context of \d+ tokens can hold", r"more than this model's context length",
    r"cannot hold with room to generate", r"more than num_ctx", r"more than the context length",
    r"longer than the context of \d+ tokens"]))
FIELD_RULES = re.compile("|".join([
    r"give one structured output constraint, not several",
    r"cannot be combined with tools unless tool_choice is 'none'", r"function names must be unique",
    r"which is not in 'tools'", r"min_tokens \(\d+\) must not exceed max_tokens",
    r"min_tokens cannot be combined with structured output", r"cannot hold a tool_(use|result) block",
    r"'name' goes with type 'tool'", r"cannot be combined with 'raw'",
    r"continue_final_message needs an assistant message last"]))
LANGUAGES = re.compile("|".join([
    r"the grammar does not parse", r"the (JSON schema|regex|choice list|grammar) cannot be compiled",
    r"the JSON schema is not valid JSON", r"a JSON schema must be an object",
    r"the choice list (is not valid JSON|must be a non-empty JSON list)"]))


@pytest.fixture(scope="module")
def fuzz_server(llm_engine: LLMEngine) -> Iterator[Live]:
    """Over a 24-token context: a request the schema allows generates 23 tokens at most (CPU is slow)."""
    config = EngineConfig(kv_cache_memory=0.01, max_num_seqs=8, max_model_len=24)
    with started_server(LLMEngine(llm_engine.runner.model, llm_engine.tokenizer, config)) as live:
        yield live


def accepted_unless_a_model_limit(ctx, response, case) -> bool | None:  # noqa: ANN001 (schemathesis' types)
    """positive_data_acceptance, except for a 400 naming a model limit, a rule between fields or a string
    that does not parse in its own language."""
    text = response.text
    if response.status_code == 400 and any(p.search(text) for p in (MODEL_LIMITS, FIELD_RULES, LANGUAGES)):
        return None
    return positive_data_acceptance(ctx, response, case)


# The schema does not depend on the model, so an app without an engine provides it at collection time.
schema = schemathesis.openapi.from_dict(create_app(None, ServerSettings()).openapi())


EXAMPLES = int(os.environ.get("LLAMASERVE_FUZZ_EXAMPLES", "10"))
# The embedding routes take up to 2,048 inputs a request, embedded one forward each: generated lists make
# an example cost seconds, so they get a fifth of the examples (make stress: 20 each).
EMBEDDINGS = r"^/(v1/embeddings|api/embed)$"


def _call(case: schemathesis.Case, live: Live) -> None:
    case.call_and_validate(base_url=live.url, headers=live.headers, timeout=60,
                           excluded_checks=[positive_data_acceptance],
                           additional_checks=[accepted_unless_a_model_limit])


@schema.exclude(path_regex=EMBEDDINGS).parametrize()
@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_all_checks(case: schemathesis.Case, fuzz_server: Live) -> None:
    _call(case, fuzz_server)


@schema.include(path_regex=EMBEDDINGS).parametrize()
@settings(max_examples=max(2, EXAMPLES // 5), deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_all_checks_on_the_embedding_routes(case: schemathesis.Case, fuzz_server: Live) -> None:
    _call(case, fuzz_server)
