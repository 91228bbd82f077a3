"""--kv-cache-memory auto: the pool sizes itself from free memory; admission matches what it can hold."""

from __future__ import annotations

import pytest
import torch

from llamaserve.config import EngineConfig
from llamaserve.engine import model_runner
from llamaserve.engine.llm_engine import LLMEngine
from llamaserve.engine.model_runner import GiB, memory_margin, plan_kv_cache
from llamaserve.engine.sampling_params import SamplingParams
from tests.engine.test_llm_engine import QUESTIONS, chat_ids

PER_TOKEN = 2 * 30 * 3 * 64 * 4  # SmolLM2-135M K/V in float32 (the exact mode): 45 KiB
CTX = 256


def fake_memory(monkeypatch, free: int, total: int = 16 * GiB) -> None:
    monkeypatch.setattr(model_runner, "free_memory", lambda device: (free, total))


def test_auto_holds_max_num_seqs_contexts_when_memory_allows(smollm_parts) -> None:
    model = smollm_parts[0]
    plan = plan_kv_cache(model, EngineConfig(max_num_seqs=4), CTX, memory=(64 * GiB, 64 * GiB))
    assert plan.dtype == torch.float32 and plan.bytes_per_token == PER_TOKEN
    assert plan.num_tokens == 4 * CTX and "auto: 4.0 full 256-token contexts" in plan.describe()


def test_auto_shrinks_with_free_memory_down_to_one_context(smollm_parts) -> None:
    model, total = smollm_parts[0], 16 * GiB
    margin = memory_margin(total)
    assert margin == int(1.6 * GiB)  # a tenth of the memory, at least 1 GiB
    free = margin + int(2.5 * CTX * PER_TOKEN)  # room for two and a half contexts beyond the margin
    plan = plan_kv_cache(model, EngineConfig(), CTX, memory=(free, total))
    assert plan.num_tokens == int(2.5 * CTX) // 16 * 16
    plan = plan_kv_cache(model, EngineConfig(), CTX, memory=(margin + CTX * PER_TOKEN, total))
    assert plan.num_tokens == CTX  # exactly one full context
    with pytest.raises(ValueError, match="cannot hold one full context") as err:
        plan_kv_cache(model, EngineConfig(), CTX, memory=(margin + CTX * PER_TOKEN - 1, total))
    for flag in ("--max-model-len", "--kv-cache-dtype int8", "--kv-cache-memory"):
        assert flag in str(err.value)
    # int8 K/V: the same memory holds 45 / 12 times the tokens
    plan = plan_kv_cache(model, EngineConfig(kv_cache_dtype="int8"), CTX, memory=(free, total))
    assert plan.bytes_per_token == 2 * 30 * 3 * (64 + 4) and plan.num_tokens >= 9 * CTX


def test_an_explicit_size_is_kept(smollm_parts) -> None:
    plan = plan_kv_cache(smollm_parts[0], EngineConfig(kv_cache_memory=0.01), CTX, memory=(0, 1))
    assert plan.num_blocks == int(0.01 * GiB // (16 * PER_TOKEN)) and "--kv-cache-memory 0.01" in plan.how


def test_engine_refuses_to_start_without_room_for_one_context(smollm_parts, monkeypatch) -> None:
    fake_memory(monkeypatch, 2 * GiB)  # 0.4 GiB beyond the margin; one 8,192-token context is 0.35 GiB
    engine = LLMEngine(*smollm_parts, EngineConfig(max_model_len=8192))
    assert engine.num_blocks == (2 * GiB - memory_margin(16 * GiB)) // (16 * PER_TOKEN)
    fake_memory(monkeypatch, int(1.8 * GiB))
    with pytest.raises(ValueError, match="cannot hold one full context: 8,192 tokens"):
        LLMEngine(*smollm_parts, EngineConfig(max_model_len=8192))


def test_default_max_tokens_is_admitted_whatever_is_free_and_preempts_if_it_must(smollm_parts,
                                                                                   monkeypatch) -> None:
    """Auto sizing faked to one context and a half: three requests without max_tokens are all admitted
    (none is refused for what is free now); they run to the context's end with finish_reason "length",
    preempting and recomputing one another, each with the text it has alone."""
    ctx = 96
    fake_memory(monkeypatch, memory_margin(16 * GiB) + int(1.5 * ctx * PER_TOKEN))
    engine = LLMEngine(*smollm_parts, EngineConfig(max_model_len=ctx))
    assert ctx <= engine.num_blocks * 16 < 2 * ctx
    params = SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True)
    prompts = [chat_ids(engine, q) for q in QUESTIONS[:3]]
    alone = [engine.generate([p], params)[0][0] for p in prompts]
    got: dict[str, list[int]] = {f"r{i}": [] for i in range(3)}
    reasons = {}
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished:
        for out in engine.step():
            got[out.request_id] += out.outputs[0].token_ids
            reasons[out.request_id] = out.outputs[0].finish_reason
    assert list(got.values()) == alone
    assert [len(p) + len(a) for p, a in zip(prompts, alone, strict=True)] == [ctx] * 3
    assert set(reasons.values()) == {"length"}
    assert engine.scheduler.num_preemptions > 0


def test_a_pool_smaller_than_the_context_caps_default_max_tokens_and_refuses_what_never_fits(
        smollm_parts) -> None:
    engine = LLMEngine(*smollm_parts, EngineConfig(kv_cache_memory=8 * 16 * PER_TOKEN / GiB))
    assert engine.num_blocks == 8 and engine.max_model_len == 8192  # 128 tokens of an 8,192 context
    prompt = chat_ids(engine, QUESTIONS[0])
    ((ids,),) = engine.generate([prompt], SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True))
    assert len(ids) == 128 - len(prompt)  # to the end of the pool (finish_reason "length")
    with pytest.raises(ValueError, match=r"exceed the KV cache \(128 tokens\)"):
        engine.check_request(prompt, SamplingParams(max_tokens=200))
    with pytest.raises(ValueError, match="leaves no room to generate within the KV cache"):
        engine.check_request(list(range(128)), SamplingParams(max_tokens=None))
    with pytest.raises(ValueError, match="context length is 8192 tokens"):
        engine.check_request(prompt, SamplingParams(max_tokens=9000))
