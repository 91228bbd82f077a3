"""The one-call native decode step (FusedDecoder) against the layer-by-layer torch path."""

from __future__ import annotations

import pytest
import torch

from llamaserve.loader.weights import load_model
from llamaserve.model import native
from llamaserve.model.kv_cache import build_metadata
from tests.checkpoints import rel_err, tiny_hf_model
from tests.paged import native_pools, new_seqs, step

pytestmark = pytest.mark.skipif(not native.available(), reason="no AVX2 CPU or no C compiler")


def decode_both_ways(net, prompts: list[list[int]], steps: int = 6) -> list[tuple[float, bool]]:
    """Prefill, then decode greedily in one batch; each decode step runs layer by layer, then fused
    (same slots: the fused run overwrites the new token's K/V). Returns (relative error, same argmax)."""
    fused = native.FusedDecoder.for_model(net)
    assert fused is not None
    runs = []
    fused_run = fused.run
    fused.run = lambda *args: (runs.append(1), fused_run(*args))[1]
    cache, seqs = new_seqs(net, prompts, extra=steps + 1)
    logits = step(net, cache, [(s, len(s.ids)) for s in seqs], last_only=True)
    results = []
    try:
        for _ in range(steps):
            for s, lg in zip(seqs, logits, strict=True):
                s.ids.append(int(lg[-1].argmax()))
            done = [s.done for s in seqs]
            ref = step(net, cache, [(s, 1) for s in seqs])
            for s, d in zip(seqs, done, strict=True):
                s.done = d
            logits = step(net, cache, [(s, 1) for s in seqs], fused=fused)
            for a, b in zip(logits, ref, strict=True):
                results.append((rel_err(a, b), bool(a.argmax() == b.argmax())))
    finally:
        fused.run = fused_run
    assert len(runs) == steps  # the fused path did run, once per decode step
    return results


def teacher_forced_decode(net, ids: list[int], prefill: int, fused=None) -> torch.Tensor:
    """Logits [len(ids) - prefill, vocab]: prefill the first tokens, then feed the rest one per step."""
    cache, (seq,) = new_seqs(net, [ids])
    step(net, cache, [(seq, prefill)])
    return torch.cat([step(net, cache, [(seq, 1)], fused=fused)[0] for _ in range(len(ids) - prefill)])


def test_int4_embedded_model_decodes_as_close_to_float32_fused(hf_tokenizer):
    """On the real model both decode paths round activations to int8, and a last-bit difference upstream
    can flip one rounding (one step of a block's scale) downstream: the fused path is held to the same
    distance from float32 as the layer-by-layer path, not to equality with it."""
    net, _ = load_model(None, quantization="int4")
    fused_decoder = native.FusedDecoder.for_model(net)
    assert fused_decoder is not None  # every layer is Q4_1 on our kernels, the head is int8
    ref_net, _ = load_model(None, quantization="none")
    ids = hf_tokenizer.encode("The capital of France is Paris, and the capital of Italy is Rome. Water is")
    ref = teacher_forced_decode(ref_net, ids, 4)
    fused = teacher_forced_decode(net, ids, 4, fused_decoder)
    layered = teacher_forced_decode(net, ids, 4)
    errs = {name: rel_err(out, ref) for name, out in (("fused", fused), ("layered", layered))}
    agree = {name: int((out.argmax(-1) == ref.argmax(-1)).sum()) for name, out in (("fused", fused),
                                                                                   ("layered", layered))}
    print(f"decode vs float32 over {len(ids) - 4} steps: error {errs}, top-1 agreement {agree}")
    assert errs["fused"] < 0.1 and errs["fused"] < 1.5 * errs["layered"] + 0.01
    assert agree["fused"] >= agree["layered"] - 1


@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])  # multi-head and grouped-query attention
def test_int8_tiny_checkpoint_decodes_the_same_fused(tmp_path, heads):
    model = tiny_hf_model(seed=3, num_attention_heads=heads[0], num_key_value_heads=heads[1])
    model.save_pretrained(tmp_path)
    net, _ = load_model(str(tmp_path), quantization="int8")
    prompts = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (5, 40, 17)]
    results = decode_both_ways(net, prompts)
    assert max(e for e, _ in results) < 2e-3
    assert sum(same for _, same in results) >= len(results) - 1  # random tiny models have near-ties


def test_models_off_the_native_kernels_keep_the_layer_path(monkeypatch):
    assert native.FusedDecoder.for_model(load_model(None, quantization="none")[0]) is None  # dense
    assert native.FusedDecoder.for_model(load_model(None)[0]) is not None  # auto: Q4_1 and Q8_0 blocks
    monkeypatch.setattr(native, "available", lambda: False)
    assert native.FusedDecoder.for_model(load_model(None, quantization="int4")[0]) is None  # torch int4



def test_the_fused_step_applies_the_final_norm_as_the_model_does(tmp_path):
    """The fused call ends with the model's last RMSNorm (in our C arithmetic: torch may sum in another
    order); with final_norm=False it returns the hidden states before that norm."""
    tiny_hf_model(seed=5, num_attention_heads=4, num_key_value_heads=2).save_pretrained(tmp_path)
    net, _ = load_model(str(tmp_path), quantization="int8")
    fused = native.FusedDecoder.for_model(net)
    assert fused is not None
    cache, seqs = new_seqs(net, [[1, 2, 3, 4, 5], [7, 8, 9]], extra=2)
    step(net, cache, [(s, len(s.ids)) for s in seqs])
    meta = build_metadata([(s.table, s.done, 1) for s in seqs], cache.block_size)
    x, cos, sin = net.embed(torch.tensor([11, 12]), torch.tensor([s.done for s in seqs]))
    args = (cos, sin, meta.slot_mapping, meta.ctx_slots, meta.ctx_lens, native_pools(cache))
    before = fused.run(x, *args, final_norm=False)
    after = fused.run(x, *args)  # (the same new K/V are stored again: the same inputs)
    assert not torch.equal(before, after)
    assert rel_err(after, net.norm(before)) < 1e-6
