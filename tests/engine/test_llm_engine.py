"""The engine on the embedded model: batching invariance, seeds, n > 1, stops, logprobs, pool accounting."""

from __future__ import annotations

import pytest
import torch

from llamaserve.config import EngineConfig
from llamaserve.engine.llm_engine import LLMEngine
from llamaserve.engine.sampling_params import SamplingParams
from llamaserve.loader.weights import load_model
from llamaserve.model import native
from llamaserve.model.kv_cache import PagedKVCache, build_metadata

QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "Write a haiku about the sea.",
    "What is 12 times 7?", "Explain gravity to a child.", "List two uses of copper.",
    "Who wrote Hamlet?", "Give me a synonym for happy.", "What is photosynthesis?",
    "Translate 'good morning' to Spanish.", "Why is the sky blue?", "Suggest a name for a cat.",
    "What does a CPU do?", "How many legs does a spider have?", "Describe a sunset in one sentence.",
    "What is the boiling point of water?",
]


def make_engine(parts, **kw) -> LLMEngine:
    model, tokenizer = parts
    return LLMEngine(model, tokenizer, EngineConfig(**({"kv_cache_memory": 0.1} | kw)))


def chat_ids(engine: LLMEngine, q: str) -> list[int]:
    return engine.tokenizer.encode_chat([{"role": "user", "content": q}])


@pytest.mark.parametrize("quantization", ["none", "int4", "auto"])
def test_batched_greedy_equals_one_by_one(smollm_parts, quantization):
    """Determinism under batching: each request's greedy text does not depend on its batch-mates.

    int4 and auto (the default) cover the fast paths too: our kernels, int8 head or GGUF blocks, and the
    default bfloat16 K/V read by our attention kernel."""
    model = smollm_parts[0] if quantization == "none" else load_model(None, quantization=quantization)[0]
    engine = make_engine((model, smollm_parts[1]))
    prompts = [chat_ids(engine, q) for q in QUESTIONS]
    params = SamplingParams(max_tokens=24, temperature=0.0)
    alone = [engine.generate([p], params)[0][0] for p in prompts]
    together = [out[0] for out in engine.generate(prompts, params)]
    same = sum(a == b for a, b in zip(alone, together, strict=True))
    print(f"{quantization} batch invariance: {same}/16 identical")
    assert same == 16
    assert engine.block_manager.num_free_blocks == engine.num_blocks


@pytest.mark.skipif(not native.available(), reason="no AVX2 CPU or no C compiler: no fused decode")
@pytest.mark.parametrize("prefill_priority", [False, True])
def test_requests_arriving_mid_decode_do_not_change_greedy_output(smollm_parts, prefill_priority):
    """int4 runs decode tokens fused (one C call) and prefill chunks layer by layer; a step holding both
    runs them as two forwards, so a sequence's decode never changes path when a prefill joins it. With
    prefill priority (the default) an arrival's first chunk has a step of its own instead."""
    model = load_model(None, quantization="int4")[0]
    engine = make_engine((model, smollm_parts[1]), prefill_priority=prefill_priority)
    assert engine.runner.fused is not None
    prompts = [chat_ids(engine, q) for q in QUESTIONS[:4]]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    alone = [engine.generate([p], params)[0][0] for p in prompts]
    runner, forwards, calls = engine.runner, [], []  # forwards per step; each forward's chunk sizes
    inner, inner_fused, outer = runner._execute, runner._decode_fused, runner.execute

    def forward(items):  # the layer path
        calls.append((False, [i.num_new_tokens for i in items]))
        return inner(items)

    def forward_fused(items):
        calls.append((True, [i.num_new_tokens for i in items]))
        return inner_fused(items)

    def execute(sched):
        before = len(calls)
        out = outer(sched)
        forwards.append(len(calls) - before)
        return out

    runner._execute, runner._decode_fused, runner.execute = forward, forward_fused, execute
    tokens: dict[str, list[int]] = {}
    engine.add_request("r0", prompts[0], params)
    for step in range(40):
        if step in (3, 6, 7):  # the others arrive while r0 (and then r1) decode
            rid = f"r{(3, 6, 7).index(step) + 1}"
            engine.add_request(rid, prompts[int(rid[1])], params)
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
        if not engine.has_unfinished:
            break
    if prefill_priority:  # r1's and r2's prompts ran alone; r3 came right after r2's step, so it joined
        assert forwards.count(2) == 1  # the decodes (never two prefill-only steps in a row)
        assert sum(1 for fused, c in calls if not fused and len(c) == 1 and c[0] > 1) == 4
    else:
        assert forwards.count(2) >= 3  # three arrivals: each prefill ran beside decodes, as its own forward
    # never one mixed forward: decode tokens run fused, prompt chunks on the layer path
    assert all(all(n == 1 for n in c) for fused, c in calls if fused)
    assert any(not fused for fused, _ in calls)
    assert [tokens[f"r{i}"] for i in range(4)] == alone
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_seeded_sampling_repeats_alone_and_in_a_batch(smollm_parts):
    engine = make_engine(smollm_parts)
    prompt = chat_ids(engine, "Tell me a story about a dragon.")
    seeded = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=1234)
    first = engine.generate([prompt], seeded)[0][0]
    assert engine.generate([prompt], seeded)[0][0] == first
    others = [chat_ids(engine, q) for q in QUESTIONS[:5]]
    unseeded = [SamplingParams(max_tokens=20, temperature=1.0)] * 5
    mixed = engine.generate([prompt] + others, [seeded] + unseeded)
    assert mixed[0][0] == first
    different = engine.generate([prompt], SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=99))
    assert different[0][0] != first


def test_n_choices_share_the_prompt_blocks(smollm_parts):
    engine = make_engine(smollm_parts)
    prompt = chat_ids(engine, "Write a long poem about the ocean and its many moods, please.")
    assert len(prompt) > 2 * engine.config.block_size
    outs = engine.generate([prompt], SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=7))[0]
    assert len(outs) == 3 and all(len(o) == 12 or o[-1] in engine.tokenizer.eos_token_ids for o in outs)
    assert len({tuple(o) for o in outs}) > 1  # distinct seeds per choice (seed + index)
    full_blocks = (len(prompt) - 1) // engine.config.block_size
    # the two siblings found every full block of the prompt in the cache
    assert engine.block_manager.prefix_hit_tokens >= 2 * full_blocks * engine.config.block_size
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_stop_string_is_left_out(smollm_parts):
    engine = make_engine(smollm_parts)
    prompt = chat_ids(engine, "What is the capital of France?")
    full = engine.generate([prompt], SamplingParams(max_tokens=16, temperature=0.0))[0][0]
    text = engine.tokenizer.decode(full)
    assert "Paris" in text
    engine.add_request("s", prompt, SamplingParams(max_tokens=16, temperature=0.0, stop=["Paris"]))
    pieces, reasons = [], []
    while engine.has_unfinished:
        for out in engine.step():
            pieces += [c.text for c in out.outputs]
            reasons += [(c.finish_reason, c.stop_reason) for c in out.outputs if c.finish_reason]
    assert "".join(pieces) == text[: text.index("Paris")]
    assert reasons == [("stop", "Paris")]


def test_logprobs_equal_log_softmax_of_a_full_forward(smollm_parts):
    engine = make_engine(smollm_parts)
    model = smollm_parts[0]
    prompt = chat_ids(engine, "Name a fruit.")
    engine.add_request("lp", prompt, SamplingParams(max_tokens=6, temperature=0.0, logprobs=3))
    got = []
    while engine.has_unfinished:
        for out in engine.step():
            got += [lp for c in out.outputs for lp in (c.logprobs or [])]
    tokens = prompt + [g.token_id for g in got]
    cfg = model.config
    cache = PagedKVCache(cfg.num_hidden_layers, 8, 16, cfg.num_key_value_heads, cfg.head_dim, torch.float32)
    with torch.inference_mode():
        meta = build_metadata([(list(range(8)), 0, len(tokens))], 16)
        logits = model.logits(model(torch.tensor(tokens), torch.arange(len(tokens)), meta, cache))
    ref = torch.log_softmax(logits, dim=-1)
    for i, g in enumerate(got):
        row = ref[len(prompt) - 1 + i]
        assert g.logprob == pytest.approx(row[g.token_id].item(), abs=1e-4)
        top = torch.topk(row, 3)
        assert [t for t, _ in g.top] == top.indices.tolist()
        assert [v for _, v in g.top] == pytest.approx(top.values.tolist(), abs=1e-4)


@pytest.mark.skipif(not native.available(), reason="no AVX2 CPU or no C compiler: no fused decode")
def test_greedy_output_does_not_depend_on_the_prefix_cache_or_on_chunking(smollm_parts):
    """A prompt one token longer than whole blocks: a prefix-cache hit, or a prefill split into chunks,
    leaves a one-token prompt chunk. It takes the layer path as the whole prompt does (not the fused
    decode call), so the first token, and the rest, are the same either way."""
    model = load_model(None, quantization="auto")[0]
    engine = make_engine((model, smollm_parts[1]))
    prompt = chat_ids(engine, "Say hello.")
    assert len(prompt) % engine.config.block_size == 1  # the case: whole blocks plus one token
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    cold = engine.generate([prompt], params)
    warm = engine.generate([prompt], params)  # every full block from the cache: one token left to run
    assert engine.block_manager.num_free_blocks == engine.num_blocks
    chunked = make_engine((model, smollm_parts[1]), max_batch_tokens=16).generate([prompt], params)
    assert warm == cold and chunked == cold


def test_preemption_recomputes_to_the_same_text(smollm_parts):
    """A pool too small for all sequences forces preemption; greedy output is unchanged."""
    roomy = make_engine(smollm_parts)
    prompts = [chat_ids(roomy, q) for q in QUESTIONS[:6]]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    expected = roomy.generate(prompts, params)
    per_block = 2 * 30 * 16 * 3 * 64 * 4  # layers, block size, kv heads, head dim, float32
    tight = make_engine(smollm_parts, kv_cache_memory=20 * per_block / 1024**3)
    assert tight.num_blocks == 20
    got = tight.generate(prompts, params)
    assert got == expected
    assert tight.scheduler.num_preemptions > 0
    assert tight.block_manager.num_free_blocks == tight.num_blocks


def test_finished_and_aborted_requests_free_every_block(smollm_parts):
    engine = make_engine(smollm_parts)
    for i, q in enumerate(QUESTIONS[:8]):
        engine.add_request(f"r{i}", chat_ids(engine, q), SamplingParams(max_tokens=8 + i, temperature=0.0))
    engine.step()
    engine.step()
    assert engine.block_manager.num_free_blocks < engine.num_blocks
    engine.abort_request("r1")
    engine.abort_request("r6")
    aborted = 0
    while engine.has_unfinished:
        engine.step()
        if engine.num_steps == 5:
            aborted = int(engine.abort_request("r3") is not None)
    assert aborted == 1
    assert not engine.requests
    assert engine.block_manager.num_free_blocks == engine.num_blocks
    assert all(b.ref_count == 0 for b in engine.block_manager.blocks)


def test_prompt_that_does_not_fit_is_refused_with_numbers(smollm_parts):
    engine = make_engine(smollm_parts, max_model_len=64)
    with pytest.raises(ValueError, match=r"context length is 64.*prompt has 60 tokens.*max_tokens is 10"):
        engine.add_request("x", [1] * 60, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request("y", [1] * 4, SamplingParams(logit_bias={10**6: 1.0}))
    assert not engine.requests and engine.scheduler.num_waiting == 0


@pytest.mark.parametrize("quantization", ["none", "auto"])
def test_embeddings_in_one_forward_equal_each_alone(smollm_parts, quantization):
    """Embedding inputs run several to a forward (linears on all rows, attention per input); each
    input's vector is the one it gets alone: bit for bit on our kernels (auto), and within float32
    rounding on torch's dense matmul (none), whose summation order depends on the number of rows."""
    model = smollm_parts[0] if quantization == "none" else load_model(None, quantization=quantization)[0]
    engine = make_engine((model, smollm_parts[1]))
    runner = engine.runner
    prompts = [chat_ids(engine, q) for q in QUESTIONS[:3]] + [[1, 2, 3]]
    together = runner.embed_many(prompts, "mean")
    for prompt, vector in zip(prompts, together, strict=True):
        alone = runner.embed(prompt, "mean")
        if quantization == "auto":
            assert vector == alone
        assert torch.allclose(torch.tensor(vector), torch.tensor(alone), atol=1e-4, rtol=0)
    first = runner.embed_many(prompts[::-1], "last")[0]
    assert torch.allclose(torch.tensor(first), torch.tensor(runner.embed(prompts[-1], "last")), atol=1e-4)
