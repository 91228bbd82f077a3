"""The quantized layers: exact 4-bit unpacking, our linears and torch's, and the whole model's drift."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from llamaserve.loader.weights import load_model
from llamaserve.model import native
from llamaserve.model.quant import (
    GGUFLinear,
    Int4Linear,
    Int8Linear,
    QuantizedEmbedding,
    RawTensor,
    q4_from_blocks,
)
from tests.paged import forward_logits


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1])
def test_q4_blocks_unpack_exactly(qtype):
    w = np.random.default_rng(0).standard_normal((64, 96)).astype(np.float32)
    raw = quantize(w, qtype)
    q = q4_from_blocks(raw, qtype, 64, 96)
    assert int(q.q.max()) <= 15
    np.testing.assert_array_equal(q.dequantize().numpy(), dequantize(raw, qtype).reshape(64, 96))


@pytest.fixture(params=["native", "torch"])
def kernels(request, monkeypatch):
    """Run a test with our native kernels and again with torch's (the fallback where ours can't build)."""
    if request.param == "native" and not native.available():
        pytest.skip("native kernels unavailable here")
    if request.param == "torch":
        monkeypatch.setattr(native, "available", lambda: False)
    return request.param


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1])
def test_int4_linear_matches_dense(qtype, kernels):
    w = np.random.default_rng(1).standard_normal((128, 256)).astype(np.float32)
    raw = quantize(w, qtype)
    dense = torch.from_numpy(dequantize(raw, qtype).reshape(128, 256))
    x = torch.randn(7, 256)
    ref = x @ dense.T
    # Ours (GGUFLinear): activations rounded to int8 per block of 32. Torch's: exact in float32.
    tols = (2e-2, 2e-2) if kernels == "native" else (1e-5, 2e-2)
    for dtype, tol in zip((torch.float32, torch.bfloat16), tols, strict=True):
        if kernels == "native":
            lin = GGUFLinear(256, 128)
            halves = [RawTensor(qtype, raw[i : i + 64].copy(), 256) for i in (0, 64)]
        else:
            lin = Int4Linear(256, 128, dtype)
            halves = [q4_from_blocks(raw[i : i + 64], qtype, 64, 256) for i in (0, 64)]
        assert not lin.loaded
        lin.load_rows(0, halves[0])
        assert not lin.loaded  # half the rows are staged, nothing packed yet
        lin.load_rows(64, halves[1])
        assert lin.loaded
        if kernels == "native":
            assert lin.native_weight.types() == [qtype.name]  # two pieces of one type: one part
        err = ((lin(x.to(dtype)).float() - ref).abs().max() / ref.abs().max()).item()
        assert err < tol, (dtype, err)


@pytest.fixture(scope="module")
def float32_model():
    return load_model(None, quantization="none")[0]


def drift(ref, fast, tokenizer) -> tuple[float, int, int]:
    """Max relative logit error and top-1 agreement of `fast` against `ref` over four prompts."""
    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at", "Once upon a time"]
    errors, agree, total = [], 0, 0
    for p in prompts:
        ids = tokenizer.encode(p)
        a, b = forward_logits(ref, ids), forward_logits(fast, ids).float()
        errors.append(((a - b).abs().max() / a.abs().max()).item())
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += len(ids)
    return max(errors), agree, total


def test_int4_model_stays_close_to_float32(hf_tokenizer, float32_model, kernels):
    fast, _ = load_model(None, quantization="int4")
    kind = GGUFLinear if kernels == "native" else Int4Linear
    assert sum(isinstance(m, kind) for m in fast.modules()) == 4 * 30  # the exact Q4_1 blocks
    assert isinstance(fast.output, Int8Linear)  # the tied Q8_0 head, requantized to int8
    assert fast.dtype == torch.float32 and fast.tok_embeddings.weight.dtype == torch.bfloat16
    err, agree, total = drift(float32_model, fast, hf_tokenizer)
    print(f"int4 fast path ({kernels}): max relative logit error {err:.4f}, top-1 agreement {agree}/{total}")
    assert err < 0.1
    assert agree >= 0.85 * total


def test_auto_keeps_every_gguf_tensor_in_its_type_and_stays_close_to_float32(hf_tokenizer, float32_model):
    if not native.available():
        pytest.skip("native kernels unavailable here")
    fast, _ = load_model(None)  # the default: --quantization auto
    linears = [m for m in fast.modules() if isinstance(m, GGUFLinear)]
    assert len(linears) == 4 * 30 + 1 and fast.output.native_weight.types() == ["Q8_0"]  # tied Q8_0 head
    assert isinstance(fast.tok_embeddings, QuantizedEmbedding)
    assert not any(isinstance(m, torch.nn.Linear) for m in fast.modules())  # nothing dense left
    err, agree, total = drift(float32_model, fast, hf_tokenizer)
    print(f"auto: max relative logit error {err:.4f}, top-1 agreement {agree}/{total}")
    assert err < 0.1
    assert agree >= 0.85 * total


def test_int8_model_stays_close_to_float32(hf_tokenizer, float32_model, kernels):
    fast, _ = load_model(None, quantization="int8")
    assert sum(isinstance(m, Int8Linear) for m in fast.modules()) == 4 * 30 + 1  # every linear, the head too
    err, agree, total = drift(float32_model, fast, hf_tokenizer)
    print(f"int8 fast path ({kernels}): max relative logit error {err:.4f}, top-1 agreement {agree}/{total}")
    assert err < 0.1
    assert agree >= 0.85 * total


def test_int8_linear_rounds_per_row_or_block_and_stays_close_to_dense(kernels):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(304, 64, generator=g) * torch.linspace(0.01, 1.0, 304)[:, None]  # rows of varied scale
    lin = Int8Linear(w, torch.bfloat16, chunk=128)  # three chunks, the last one partial
    assert lin.native == (kernels == "native")
    deq = lin.dequantize()
    # torch: one scale per row; native: one per block of 32 values (two per row here)
    step = deq.abs().view(304, -1, 32 if lin.native else 64).amax(-1) / 127
    assert step.shape == (304, 2 if lin.native else 1)
    bound = 0.51 * step.repeat_interleave(64 // step.shape[1], dim=1) * (1 + 2**-6) + 1e-6
    assert bool(((deq - w).abs() <= bound).all())  # round to nearest, one step per scale
    x = torch.randn(64, 64, generator=g)
    ref = x.bfloat16().float() @ deq.T
    out = lin(x)
    assert out.dtype == torch.float32
    assert ((out - ref).norm(dim=0) / ref.norm(dim=0)).max().item() < 1e-2
    # All-zero and tiny rows in float16: finite scales, zeros stay zeros (no 0/0).
    half = Int8Linear(torch.cat([torch.zeros(4, 64), torch.full((4, 64), 1e-7)]), torch.float16)
    assert bool(torch.isfinite(half.dequantize()).all())
    assert bool((half(torch.ones(1, 64)).abs() < 1e-4).all())


def test_shapes_the_native_kernels_cannot_take_use_torchs():
    assert not Int8Linear(torch.randn(12, 64), torch.bfloat16).native  # rows not a multiple of 8


def test_gguf_linear_packs_big_tensors_in_slices_and_joins_them(monkeypatch):
    if not native.available():
        pytest.skip("native kernels unavailable here")
    from tests.checkpoints import random_k_blocks

    raw = random_k_blocks(np.random.default_rng(2), 64, 256, QT.Q6_K)
    whole = GGUFLinear(256, 64)
    whole.load_rows(0, RawTensor(QT.Q6_K, raw.copy(), 256))
    monkeypatch.setattr("llamaserve.model.quant.PACK_ROWS", 16)  # four slices of 16 rows
    sliced = GGUFLinear(256, 64)
    sliced.load_rows(0, RawTensor(QT.Q6_K, raw.copy(), 256))
    assert sliced.native_weight.types() == ["Q6_K"]  # joined into one part
    for k, v in whole.native_weight.parts[0][1].items():
        assert torch.equal(v, sliced.native_weight.parts[0][1][k]), k
    x = torch.randn(3, 256)
    assert torch.equal(whole(x), sliced(x))


def test_the_embedding_row_cache_gives_the_tables_rows_through_evictions() -> None:
    """Lookups through a cache of 5 rows (ids repeated within a lookup, hits beside misses, evictions,
    a lookup wider than the cache) give exactly gguf's dequantized rows; a bad id is an IndexError."""
    rng = np.random.default_rng(1)
    rows, cols = 40, 64
    data = quantize(rng.standard_normal((rows, cols)).astype(np.float32), QT.Q8_0)
    emb = QuantizedEmbedding(rows, cols)
    emb.ROW_CACHE_BYTES = 5 * 4 * cols
    emb.load(RawTensor(QT.Q8_0, data, cols))
    assert len(emb._owner) == 5
    want = torch.from_numpy(dequantize(data, QT.Q8_0))
    lookups = [[3], [3, 3, 9], [1, 2, 3, 4], [5, 3, 6], [0, 1, 2, 3, 4, 5, 6], [7, 7, 8], [39, 0]]
    lookups += [list(rng.integers(0, rows, 4)) for _ in range(30)]
    for ids in lookups:
        got = emb(torch.tensor(ids).view(1, -1))
        assert got.shape == (1, len(ids), cols)
        assert torch.equal(got[0], want[ids]), ids
        if len(set(ids)) <= 5:
            assert all(emb._owner[emb._slot_of[i]] == i for i in ids)  # each cached where the map says
    assert sorted(emb._slot_of.values()) == sorted(set(emb._slot_of.values()))
    for bad in ([-1], [rows], [2, rows + 5]):
        with pytest.raises(IndexError, match="token ids must be in"):
            emb(torch.tensor(bad))
