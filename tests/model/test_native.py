"""Our native int4/int8 kernels (kernels.c) against float32 references, and the fallback to torch's."""

from __future__ import annotations

import logging

import pytest
import torch

from llamaserve.model import native

needs_native = pytest.mark.skipif(not native.available(), reason="no AVX2 CPU or no C compiler")


def reference_q4(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    w = q.float().view(n, -1, 32) * d.float()[..., None] + m.float()[..., None]
    return w.view(n, k)


def act_quant_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Worst case of y's error from rounding x to int8 per block of 32: |dx| <= amax / 254 per element."""
    step = x.view(x.shape[0], -1, 32).abs().amax(-1, keepdim=True) / 254
    return step.expand(-1, -1, 32).reshape(x.shape) @ w.abs().T


@needs_native
@pytest.mark.parametrize("m_rows", [1, 2, 3, 5, 16, 131])  # tiles of 4 with tails; > 128 rows: two chunks
@pytest.mark.parametrize("k", [96, 256])  # 3 blocks (odd) and 8
def test_q4_linear_matches_float32_within_activation_rounding(m_rows, k):
    g = torch.Generator().manual_seed(m_rows * 1000 + k)
    n = 72
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    d = (torch.rand(n, k // 32, generator=g) * 0.05 + 1e-3).half()
    m = (-torch.rand(n, k // 32, generator=g) * 0.4).half()
    w = reference_q4(q, d, m)
    packed = native.pack_q4(q, d, m)
    assert torch.equal(native.dequantize_q4(*packed), w)  # the layout keeps every value
    x = torch.randn(m_rows, k, generator=g)
    x[0, :32] = 0  # an all-zero block: scale 0, no division by zero
    y = native.q4_linear(x, *packed)
    ref = x.double() @ w.double().T
    assert y.shape == (m_rows, n) and y.dtype == torch.float32
    bound = act_quant_bound(x, w).double() * 1.01 + 1e-4
    assert bool(((y.double() - ref).abs() <= bound).all())
    assert ((y - ref.float()).norm() / ref.norm()).item() < 0.02


@needs_native
@pytest.mark.parametrize("m_rows", [1, 4, 7])
def test_q8_linear_matches_float32_within_activation_rounding(m_rows):
    g = torch.Generator().manual_seed(m_rows)
    n, k = 56, 160
    w = torch.randn(n, k, generator=g) * torch.linspace(1e-3, 2.0, n)[:, None]
    w[3, :32] = 0  # an all-zero block
    q, d = native.quantize_q8(w, chunk=16)  # four chunks, the last partial
    assert q.dtype == torch.int8 and d.dtype == torch.float16 and d.shape == (n // 8, k // 32, 8)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127  # -128 would overflow the sign trick
    deq = native.dequantize_q8(q, d)
    step = native._ungroup_scales(d).float().repeat_interleave(32, dim=1)
    assert bool(((deq - w).abs() <= 0.5 * step * 1.001 + 1e-7).all())  # round to nearest per block
    x = torch.randn(m_rows, k, generator=g)
    y = native.q8_linear(x, q, d)
    ref = x.double() @ deq.double().T
    bound = act_quant_bound(x, deq).double() * 1.01 + 1e-4
    assert bool(((y.double() - ref).abs() <= bound).all())


def test_pack_q4_interleaves_8_rows_4_values_at_a_time():
    q = (torch.arange(8)[:, None] + torch.arange(32)[None, :]).remainder(16).to(torch.uint8)  # q[r, i]
    qs, d, m = native.pack_q4(q, torch.ones(8, 1), torch.zeros(8, 1))
    assert qs.shape == (1, 1, 128) and d.shape == m.shape == (1, 1, 8) and d.dtype == torch.float16
    byte = qs.view(4, 8, 4)  # [c][r][e]: value 4c + e of row r low, value 4(c + 4) + e high
    for c, r, e in [(0, 0, 0), (1, 3, 2), (3, 7, 3)]:
        assert int(byte[c, r, e]) == int(q[r, 4 * c + e]) | int(q[r, 4 * (c + 4) + e]) << 4


def test_unavailable_kernels_fall_back_with_a_warning(monkeypatch, caplog):
    native._lib.cache_clear()
    try:
        monkeypatch.setenv("CC", "/nonexistent/cc")
        monkeypatch.setenv("XDG_CACHE_HOME", "/nonexistent-cache")
        monkeypatch.setattr(native, "_cpu_ok", lambda: True)
        with caplog.at_level(logging.WARNING, logger=native.log.name):
            assert not native.available()
        assert "unavailable" in caplog.text and "nonexistent" in caplog.text
        with pytest.raises(RuntimeError, match="not available"):
            native.q4_linear(torch.zeros(1, 32), *native.pack_q4(torch.zeros(8, 32), torch.ones(8, 1),
                                                                   torch.zeros(8, 1)))
        native._lib.cache_clear()
        monkeypatch.delenv("CC")
        monkeypatch.setenv("LLAMASERVE_NATIVE", "0")
        assert not native.available()
    finally:
        native._lib.cache_clear()


@needs_native
def test_build_is_cached_and_survives_an_unwritable_cache(monkeypatch, tmp_path):
    native._lib.cache_clear()
    try:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        first = native._build()
        assert first.parent == tmp_path / "llamaserve" and first.exists()
        mtime = first.stat().st_mtime_ns
        assert native._build() == first and first.stat().st_mtime_ns == mtime  # not rebuilt
        assert not [p for p in first.parent.iterdir() if p != first]  # no temporary files left
        blocked = tmp_path / "file"
        blocked.write_text("")
        monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))  # a file where the cache folder would go
        assert native._build().exists()
    finally:
        native._lib.cache_clear()


@needs_native
def test_kernels_run_inside_torch_compile():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (40, 64), dtype=torch.uint8, generator=g)
    qs, d, m = native.pack_q4(q, torch.rand(40, 2, generator=g) * 0.1, -torch.rand(40, 2, generator=g))
    x = torch.randn(3, 64, generator=g)
    compiled = torch.compile(lambda t: native.linear_q4(t * 2, qs, d, m).relu(), fullgraph=True)
    assert torch.equal(compiled(x), native.q4_linear(x * 2, qs, d, m).relu())


@needs_native
def test_mismatched_shapes_are_refused_not_read_out_of_bounds():
    qs, d, m = native.pack_q4(torch.zeros(8, 64, dtype=torch.uint8), torch.ones(8, 2), torch.zeros(8, 2))
    with pytest.raises(ValueError, match="does not fit"):
        native.q4_linear(torch.zeros(1, 32), qs, d, m)
    with pytest.raises(ValueError, match="does not fit"):
        native.q4_linear(torch.zeros(1, 64, dtype=torch.float64), qs, d, m)


@needs_native
def test_q4_0_stores_no_m_and_gives_the_same_result():
    g = torch.Generator().manual_seed(5)
    q = torch.randint(0, 16, (16, 64), dtype=torch.uint8, generator=g)
    d = torch.rand(16, 2, generator=g) * 0.1
    implied = native.pack_q4(q, d, None)
    stored = native.pack_q4(q, d, -8 * d)
    assert implied[2].numel() == 0 and stored[2].numel() == 16 * 2
    assert torch.equal(native.dequantize_q4(*implied), native.dequantize_q4(*stored))
    x = torch.randn(3, 64, generator=g)
    assert torch.equal(native.q4_linear(x, *implied), native.q4_linear(x, *stored))
