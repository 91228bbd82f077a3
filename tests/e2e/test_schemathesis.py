"""Schemathesis over the app's OpenAPI schema: whatever a client sends, the answer is never a 5xx."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from llamaserve.config import EngineConfig
from llamaserve.engine.llm_engine import LLMEngine
from llamaserve.server.app import create_app
from llamaserve.server.settings import ServerSettings
from tests.e2e.conftest import Live, started_server


@pytest.fixture(scope="module")
def fuzz_server(llm_engine: LLMEngine) -> Iterator[Live]:
    """Over a 24-token context: a request the schema allows generates 23 tokens at most (CPU is slow)."""
    config = EngineConfig(kv_cache_memory=0.01, max_num_seqs=8, max_model_len=24)
    with started_server(LLMEngine(llm_engine.runner.model, llm_engine.tokenizer, config)) as live:
        yield live


# The schema does not depend on the model, so an app without an engine provides it at collection time.
schema = schemathesis.openapi.from_dict(create_app(None, ServerSettings()).openapi())


@schema.parametrize()
@settings(max_examples=15, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_no_server_errors(case: schemathesis.Case, fuzz_server: Live) -> None:
    case.call_and_validate(base_url=fuzz_server.url, headers=fuzz_server.headers, timeout=60,
                           checks=[not_a_server_error])
