"""The KV pool in each dtype: what is stored, and attention over it on our kernels and on torch's path."""

from __future__ import annotations

import random

import pytest
import torch

from llamaserve.model import native
from llamaserve.model.kv_cache import KV_DTYPES, PagedKVCache, build_metadata, decode_metadata, quantize_int8

needs_native = pytest.mark.skipif(not native.available(), reason="no AVX2 CPU or no C compiler")
DTYPES = list(KV_DTYPES.values())


def filled_cache(dtype: torch.dtype, heads_kv: int = 2, D: int = 64, blocks: int = 24, seed: int = 0,
                 use_native: bool = False) -> tuple[PagedKVCache, list[list[int]]]:
    """A one-layer pool whose every slot holds random K/V, and 3 sequences' shuffled block tables."""
    cache = PagedKVCache(1, blocks, 16, heads_kv, D, dtype)
    if use_native:
        cache.use_native()
    g = torch.Generator().manual_seed(seed)
    slots = torch.arange(cache.num_slots)
    cache.write(0, slots, torch.randn(cache.num_slots, 2 * heads_kv, D, generator=g) * 2)
    order = list(range(1, blocks))  # block 0 (slot 0 pads every context row) stays out of the tables
    random.Random(seed).shuffle(order)
    return cache, [order[0:9], order[9:12], order[12:20]]


def stored(cache: PagedKVCache) -> torch.Tensor:
    """Layer 0's pool as the float64 values it stands for."""
    pool = cache.kv[0].double()
    if cache.scales is not None:
        pool = pool * cache.scales[0].double()[..., None]
    return pool


def reference(cache: PagedKVCache, q: torch.Tensor, chunks) -> torch.Tensor:
    """Causal attention in float64 over the stored values: [T, H * D]."""
    pool, bs = stored(cache), cache.block_size
    Hkv, D = pool.shape[1] // 2, pool.shape[2]
    H, rows, t = q.shape[1], [], 0
    for table, done, n in chunks:
        slots = torch.tensor([table[i // bs] * bs + i % bs for i in range(done + n)])
        k, v = pool[slots, :Hkv], pool[slots, Hkv:]  # [ctx, Hkv, D]
        for j in range(n):
            qj = q[t + j].double()  # [H, D]
            kk = k[: done + j + 1].repeat_interleave(H // Hkv, 1)
            vv = v[: done + j + 1].repeat_interleave(H // Hkv, 1)
            w = torch.softmax(torch.einsum("hd,thd->ht", qj, kk) / D**0.5, dim=-1)
            rows.append(torch.einsum("ht,thd->hd", w, vv).reshape(-1))
        t += n
    return torch.stack(rows)


def queries(chunks, H: int, D: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(sum(n for _, _, n in chunks), H, D, generator=torch.Generator().manual_seed(seed))


PREFILL = lambda tables: [(tables[0], 100, 37), (tables[1], 0, 41), (tables[2], 7, 9)]  # noqa: E731
DECODE = lambda tables: [(tables[0], 140, 1), (tables[1], 0, 1), (tables[2], 60, 1)]  # noqa: E731


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("shape", [PREFILL, DECODE], ids=["prefill", "decode"])
@pytest.mark.parametrize("D", [64, 136])  # 136: two 64-value passes of the decode path, then 8 values
def test_native_attention_equals_float64_over_the_stored_values(dtype, heads, shape, D) -> None:
    H, Hkv = heads
    cache, tables = filled_cache(dtype, Hkv, D=D, use_native=True)
    chunks = shape(tables)
    q = queries(chunks, H, D)
    out = cache.attend(0, q, build_metadata(chunks, 16))
    assert out.dtype == torch.float32 and out.shape == (q.shape[0], H * D)
    err = (out.double() - reference(cache, q, chunks)).abs().max().item()
    assert err < 2e-5  # float32 arithmetic on the exact stored values: any dtype error is in the pool


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_attention_reads_the_pool_in_its_own_dtype(dtype) -> None:
    cache, tables = filled_cache(dtype, 2)
    chunks = PREFILL(tables)
    q = queries(chunks, 6, 64)
    out = cache.attend(0, q, build_metadata(chunks, 16))
    err = (out.double() - reference(cache, q, chunks)).abs().max().item()
    # float32 pools: float32 attention; 16-bit and int8 pools: attention in 16 bits (q rounded too)
    assert err < (2e-5 if dtype == torch.float32 else 5e-2)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_and_torch_stores_write_the_same_pool(dtype) -> None:
    kv_new = torch.randn(50, 4, 64, generator=torch.Generator().manual_seed(3)) * 3
    kv_new[7, 1] = 0.0  # an all-zero head: scale 0, values 0
    slots = torch.randperm(64, generator=torch.Generator().manual_seed(4))[:50]
    ours, torchs = PagedKVCache(1, 4, 16, 2, 64, dtype), PagedKVCache(1, 4, 16, 2, 64, dtype)
    ours.use_native()
    ours.write(0, slots, kv_new)
    torchs.write(0, slots, kv_new)
    assert torch.equal(ours.kv[0][slots], torchs.kv[0][slots])
    if dtype == torch.int8:
        assert torch.equal(ours.scales[0][slots], torchs.scales[0][slots])
        assert ours.scales[0][slots[7], 1] == 0 and not ours.kv[0][slots[7], 1].any()
    else:
        assert torch.equal(ours.kv[0][slots].float(), kv_new.to(dtype).float())  # torch's rounding


@needs_native
def test_native_bfloat16_store_rounds_like_torch_at_the_edges() -> None:
    """The vectorized float32 -> bfloat16 store: ties to even, overflow to inf, infinities, tiny and
    negative zero give torch's bits exactly; NaN stays NaN (in every lane of a vector and in the tail)."""
    one = 1.0
    edges = [one + 2**-8, one + 3 * 2**-8, -(one + 2**-8), 3.4028235e38, -3.4028235e38, float("inf"),
             float("-inf"), 1e-40, -0.0, 0.0, 65504.0, 1 / 3]
    values = torch.tensor(edges * 11, dtype=torch.float32)[:128].view(1, 2, 64)  # both heads, every lane
    ours, torchs = (PagedKVCache(1, 1, 16, 1, 64, torch.bfloat16) for _ in range(2))
    ours.use_native()
    slot = torch.tensor([5])
    ours.write(0, slot, values)
    torchs.write(0, slot, values)
    assert torch.equal(ours.kv[0][5].view(torch.int16), torchs.kv[0][5].view(torch.int16))
    nan = values.clone()
    nan[0, 0, ::3] = float("nan")
    ours.write(0, slot, nan)
    assert torch.equal(ours.kv[0][5].float().isnan(), nan[0].isnan())


def test_int8_keeps_a_scale_per_token_and_head_within_half_a_step() -> None:
    x = torch.randn(10, 4, 128) * torch.logspace(-3, 2, 4)[None, :, None]  # heads of very different size
    q, scale = quantize_int8(x)
    assert q.dtype == torch.int8 and scale.shape == (10, 4) and q.abs().max() == 127
    assert ((q.float() * scale[..., None] - x).abs() <= scale[..., None] / 2 + 1e-7).all()


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8], ids=str)
@pytest.mark.parametrize("D", [64, 136])
def test_native_attention_is_batch_invariant_and_decode_equals_a_prefill_row(dtype, D) -> None:
    cache, tables = filled_cache(dtype, 2, D=D, use_native=True)
    q = queries(PREFILL(tables), 6, D)
    together = cache.attend(0, q, build_metadata(PREFILL(tables), 16))
    first = cache.attend(0, q[:37], build_metadata([(tables[0], 100, 37)], 16))
    assert torch.equal(first, together[:37])  # alone or batched: the same bits
    row = cache.attend(0, q[36:37], build_metadata([(tables[0], 136, 1)], 16))  # decode at position 136
    assert torch.equal(row, together[36:37])


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8], ids=str)
@pytest.mark.parametrize("batch", [2, 12])
def test_a_batch_of_decode_rows_computes_what_each_row_computes_alone(dtype, batch) -> None:
    # One token per sequence. A lone row is split one head per work item; 2 sequences take 2 heads an
    # item (the 3 heads of a KV head split 2 + 1); 12 take a sequence's 6 heads whole (two KV heads, 3
    # heads sharing each converted key and value). The bits must not depend on the split.
    cache, tables = filled_cache(dtype, 2, blocks=40, use_native=True)
    order = [b for t in tables for b in t] + [b for b in range(1, 40) if b not in sum(tables, [])]
    chunks = [(order[3 * i: 3 * i + 3], 20 + 2 * i, 1) for i in range(batch)]
    q = queries(chunks, 6, 64)
    together = cache.attend(0, q, build_metadata(chunks, 16))
    for i, chunk in enumerate(chunks):
        assert torch.equal(cache.attend(0, q[i:i + 1], build_metadata([chunk], 16)), together[i:i + 1])
    atol = 2e-2 if dtype == torch.int8 else 1e-5
    assert torch.allclose(together.double(), reference(cache, q, chunks), atol=atol)


@needs_native
def test_native_kernels_refuse_slots_outside_the_pool() -> None:
    cache, tables = filled_cache(torch.bfloat16, 2, use_native=True)
    meta = build_metadata([(tables[0], 0, 3)], 16)
    with pytest.raises(ValueError, match="refused its arguments"):
        cache.write(0, torch.tensor([0, 1, cache.num_slots]), torch.zeros(3, 4, 64))
    meta.ctx_slots[0, 1] = cache.num_slots + 5
    with pytest.raises(ValueError, match="refused its arguments"):
        cache.attend(0, torch.zeros(3, 6, 64), meta)
    with pytest.raises(ValueError, match="int8 KV pool needs"):
        native.NativeKV(cache.kv[0].to(torch.int8), None)


def test_bytes_per_token_of_llama2_7b() -> None:
    mib = 1024**2
    assert PagedKVCache.bytes_per_token(32, 32, 128, torch.bfloat16) == 0.5 * mib
    assert PagedKVCache.bytes_per_token(32, 32, 128, torch.float32) == 1.0 * mib
    assert PagedKVCache.bytes_per_token(32, 32, 128, torch.int8) / mib == pytest.approx(0.2578, abs=1e-4)


def test_decode_metadata_is_build_metadatas_for_one_token_chunks() -> None:
    """The fused decode path's short cut gives the very slot_mapping, ctx_slots and ctx_lens that
    build_metadata gives for the same one-token chunks (tables with spare blocks, padding columns)."""
    rng = random.Random(0)
    for _ in range(300):
        bs = rng.choice([1, 4, 16, 32])
        tables, done = [], []
        for _ in range(rng.randint(1, 9)):
            d = rng.randint(0, 200)
            tables.append(rng.sample(range(1000), -(-(d + 1) // bs) + rng.randint(0, 2)))
            done.append(d)
        meta = build_metadata([(t, d, 1) for t, d in zip(tables, done, strict=True)], bs)
        got = decode_metadata(tables, done, bs)
        for a, b in zip(got, (meta.slot_mapping, meta.ctx_slots, meta.ctx_lens), strict=True):
            assert a.dtype == b.dtype == torch.int64 and torch.equal(a, b)


@pytest.mark.skipif(not native.maps_supported(), reason="no private anonymous maps here")
def test_cpu_pools_are_zeroed_writable_maps_on_huge_page_boundaries() -> None:
    cache = PagedKVCache(2, 300, 16, 2, 64, torch.bfloat16)
    for pool in cache.kv:
        assert pool.shape == (300 * 16, 4, 64) and pool.dtype == torch.bfloat16 and pool.is_contiguous()
        assert pool.data_ptr() % native.HUGE_PAGE == 0
        assert not bool(pool.any())  # zero-filled, slot 0 included
        pool[-1] = 1.5  # writable
        assert bool((pool[-1] == 1.5).all())
    assert native.empty_huge((0, 3), torch.float32).shape == (0, 3)
