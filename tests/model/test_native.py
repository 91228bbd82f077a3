"""Our CPU kernels (csrc/): every GGUF type x every ISA variant this CPU has against gguf's reference
dequantization and a float32 matmul; the C ABI's checks; the private kernel cache; the fallback."""

from __future__ import annotations

import ctypes
import logging
import os

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

from llamaserve.model import formats, native

needs_native = pytest.mark.skipif(not native.available(), reason="no AVX2 CPU or no C compiler")
# Byte offsets of each type's float16 fields inside a block (ggml-common.h).
F16_FIELDS = {QT.Q4_0: (0,), QT.Q4_1: (0, 2), QT.Q5_0: (0,), QT.Q5_1: (0, 2), QT.Q8_0: (0,),
              QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,)}


def random_blocks(qtype: QT, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random bytes of a [rows, cols] tensor in qtype, with small finite float16 scales (and mins)."""
    rng = np.random.default_rng(seed)
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows * cols // bs, ts), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        scale = rng.uniform(5e-4, 3e-3, raw.shape[0]).astype(np.float16)
        raw[:, off : off + 2] = scale.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def act_quant_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Worst case of y's error from rounding x to int8 per block of 32: |dx| <= amax / 254 per element."""
    step = x.view(x.shape[0], -1, 32).abs().amax(-1, keepdim=True) / 254
    return step.expand(-1, -1, 32).reshape(x.shape) @ w.abs().T


@pytest.fixture(params=list(native.VARIANTS))
def variant(request, monkeypatch):
    """Each ISA variant the CPU has, forced through LLAMASERVE_KERNELS (skipped where the CPU lacks it)."""
    if request.param not in native.supported_variants():
        pytest.skip(f"this CPU has no {request.param}")
    monkeypatch.setenv("LLAMASERVE_KERNELS", request.param)
    native.kernels.cache_clear()
    assert native.kernels().variant == request.param, native.info()
    yield request.param
    native.kernels.cache_clear()


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # libgomp is shared with torch: the kernels' parallel loops split in two
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("qtype", list(formats.FORMATS), ids=lambda q: q.name)
def test_unpacking_is_exact(qtype):
    raw = random_blocks(qtype, 16, 512, seed=qtype.value)
    ref = dequantize(raw, qtype).reshape(16, 512)
    ours = formats.dequantize(qtype, formats.unpack(qtype, raw, 16, 512)).numpy()
    np.testing.assert_array_equal(ours, ref)


@needs_native
@pytest.mark.parametrize("m_rows", [1, 7, 64, 300])  # decode, a tile tail, a GEMM, > 128 rows: 3 passes
@pytest.mark.parametrize("qtype", list(formats.FORMATS), ids=lambda q: q.name)
def test_matmul_matches_the_reference_within_activation_rounding(qtype, m_rows, variant, two_threads):
    """Weights are exact, so y differs from x @ W^T only by rounding x to int8 per block of 32."""
    n, k = 40, 512  # 5 groups of 8 rows: on avx512vnni two 16-row pairs and a lone group
    raw = random_blocks(qtype, n, k, seed=qtype.value * 7 + m_rows)
    w = torch.from_numpy(dequantize(raw, qtype).reshape(n, k))
    weight = native.NativeWeight(k, [(qtype, formats.pack(qtype, formats.unpack(qtype, raw, n, k)))])
    g = torch.Generator().manual_seed(m_rows)
    x = torch.randn(m_rows, k, generator=g)
    x[0, :32] = 0  # an all-zero block: scale 0, no division by zero
    y = weight.matmul(x)
    ref = x.double() @ w.double().T
    assert y.shape == (m_rows, n) and y.dtype == torch.float32
    bound = act_quant_bound(x, w).double() * 1.01 + 1e-5  # + float32 accumulation
    assert bool(((y.double() - ref).abs() <= bound).all()), ((y.double() - ref).abs() / bound).max()
    assert ((y - ref.float()).norm() / ref.norm()).item() < 0.02


@needs_native
@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q6_K, QT.Q8_0, QT.Q5_0], ids=lambda q: q.name)
def test_one_row_against_long_rows_matches_the_reference(qtype, variant, two_threads):
    """K >= 2048: on avx512vnni one activation row then takes the weights 16 rows at a time (shorter rows
    8 at a time, as the test above has them); 40 rows leave a lone 8-row group."""
    n, k = 40, 2048
    raw = random_blocks(qtype, n, k, seed=qtype.value)
    w = torch.from_numpy(dequantize(raw, qtype).reshape(n, k))
    weight = native.NativeWeight(k, [(qtype, formats.pack(qtype, formats.unpack(qtype, raw, n, k)))])
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(5))
    ref = x.double() @ w.double().T
    bound = act_quant_bound(x, w).double() * 1.01 + 1e-5
    assert bool(((weight.matmul(x).double() - ref).abs() <= bound).all())


@pytest.mark.parametrize("qtype", [q for q in formats.FORMATS if q not in (QT.Q2_K, QT.Q3_K)],
                         ids=lambda q: q.name)
def test_packed_weights_take_the_bytes_of_the_file(qtype):
    """Re-laid out, barely grown: what a 7B file holds is what RSS holds, but for Q4_K's and Q5_K's 6-bit
    scales and mins, a byte each (16 bytes per 8 sub-blocks, GGUF's 12: 4 more per 256 values, 2.8% of
    Q4_K). Q2_K and Q3_K keep their values as nibbles (more bytes)."""
    raw = random_blocks(qtype, 16, 512, seed=1)
    bufs = formats.pack(qtype, formats.unpack(qtype, raw, 16, 512))
    extra = 4 * 16 * 512 // 256 if qtype in (QT.Q4_K, QT.Q5_K) else 0
    assert sum(t.numel() * t.element_size() for t in bufs.values()) == raw.nbytes + extra


@needs_native
def test_parts_of_different_types_fill_their_own_columns(two_threads):
    """A fused q/k/v whose v is Q6_K: three parts, each writing its rows' columns of y."""
    k, pieces = 512, [(QT.Q4_K, 24), (QT.Q8_0, 8), (QT.Q6_K, 16)]
    raws = [random_blocks(q, n, k, seed=i) for i, (q, n) in enumerate(pieces)]
    weight = native.NativeWeight(k, [(q, formats.pack(q, formats.unpack(q, r, n, k)))
                                     for (q, n), r in zip(pieces, raws, strict=True)])
    assert weight.n == 48 and weight.types() == ["Q4_K", "Q8_0", "Q6_K"]
    w = torch.cat([torch.from_numpy(dequantize(r, q).reshape(n, k))
                   for (q, n), r in zip(pieces, raws, strict=True)])
    x = torch.randn(5, k)
    ref = x.double() @ w.double().T
    bound = act_quant_bound(x, w).double() * 1.01 + 1e-5
    assert bool(((weight.matmul(x).double() - ref).abs() <= bound).all())


@needs_native
def test_the_c_side_refuses_what_it_cannot_trust():
    raw = random_blocks(QT.Q4_K, 8, 256, seed=0)
    bufs = formats.pack(QT.Q4_K, formats.unpack(QT.Q4_K, raw, 8, 256))
    with pytest.raises(ValueError, match="refused"):
        native.NativeWeight(288, [(QT.Q4_K, bufs)])  # k not a multiple of 256 for a K type
    with pytest.raises(ValueError, match="refused"):
        native.NativeWeight(256, [(QT.Q4_K, {**bufs, "sc": torch.empty(0, dtype=torch.int8)})])  # no scales
    with pytest.raises(ValueError, match="refused"):  # Q4_K's mins live with its scales: a separate one is
        native.NativeWeight(256, [(QT.Q4_K, {**bufs, "mn": torch.zeros(8, dtype=torch.int8)})])  # an error
    weight = native.NativeWeight(256, [(QT.Q4_K, bufs)])
    with pytest.raises(ValueError, match="does not fit"):
        weight.matmul(torch.zeros(1, 128))
    # The fused decode step checks its sizes: head_dim 1024 is above the kernel's limit.
    lib = native.kernels().lib
    cfg = torch.tensor([1, 1, 1024, 1, 1, 1024, 8, 32, 0], dtype=torch.int64)
    x = torch.zeros(1, 1024)
    zeros = torch.zeros(64, dtype=torch.int64)
    ptrs = torch.zeros(7, dtype=torch.int64)
    rc = lib.ls_decode_layers(cfg.data_ptr(), ctypes.c_float(1e-5), x.data_ptr(), x.data_ptr(), x.data_ptr(),
                              zeros.data_ptr(), zeros.data_ptr(), zeros.data_ptr(), ptrs.data_ptr())
    assert rc == native.LS_EINVAL
    assert native.kernels().lib.ls_sizeof_linear() == ctypes.sizeof(native.LsLinear)


def test_a_kernel_cache_others_can_write_or_own_is_refused(tmp_path, monkeypatch, caplog):
    cache = tmp_path / "llamaserve"
    cache.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert native.cache_dir() == cache
    os.chmod(cache, 0o770)  # group-writable: another user could plant a library
    with pytest.raises(PermissionError, match="writable by group"):
        native.check_private_dir(cache)
    with caplog.at_level(logging.WARNING, logger=native.log.name):
        fresh = native.cache_dir()
    assert fresh != cache and "refused" in caplog.text
    assert fresh.stat().st_mode & 0o077 == 0 and fresh.stat().st_uid == os.getuid()
    os.chmod(cache, 0o700)
    if os.getuid() == 0:  # root can give the directory away: owned by someone else is refused too
        os.chown(cache, 65534, 65534)
        with pytest.raises(PermissionError, match="owned by uid 65534"):
            native.check_private_dir(cache)
        assert native.cache_dir() != cache
    link = tmp_path / "link"
    link.symlink_to(fresh)
    with pytest.raises(PermissionError, match="not a directory"):
        native.check_private_dir(link)


@needs_native
def test_build_is_cached_in_a_private_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    variant = native.supported_variants()[-1]
    first = native._build(variant)
    assert first.parent == tmp_path / "llamaserve" and first.parent.stat().st_mode & 0o777 == 0o700
    mtime = first.stat().st_mtime_ns
    assert native._build(variant) == first and first.stat().st_mtime_ns == mtime  # not rebuilt
    assert not [p for p in first.parent.iterdir() if p != first]  # no temporary files left


def test_unavailable_kernels_fall_back_and_say_why(monkeypatch, caplog):
    native.kernels.cache_clear()
    try:
        monkeypatch.setenv("CC", "/nonexistent/cc")
        monkeypatch.setattr(native, "supported_variants", lambda: ["avx2"])
        with caplog.at_level(logging.WARNING, logger=native.log.name):
            assert not native.available()
        assert "unavailable" in caplog.text and "nonexistent" in native.info()
        with pytest.raises(RuntimeError, match="not available"):
            native._require()
        native.kernels.cache_clear()
        monkeypatch.delenv("CC")
        monkeypatch.setenv("LLAMASERVE_KERNELS", "torch")
        assert not native.available() and "LLAMASERVE_KERNELS=torch" in native.info()
        native.kernels.cache_clear()
        monkeypatch.setenv("LLAMASERVE_KERNELS", "avx512vnni")
        monkeypatch.setattr(native, "cpu_flags", lambda: {"avx2", "fma", "f16c"})
        assert not native.available() and "lacks" in native.info() and "avx512_vnni" in native.info()
        native.kernels.cache_clear()
        monkeypatch.setenv("LLAMASERVE_KERNELS", "sse9")
        assert not native.available() and "not one of" in native.info()
        native.kernels.cache_clear()
        monkeypatch.setenv("LLAMASERVE_KERNELS", "auto")
        monkeypatch.setattr(native, "supported_variants", lambda: [])
        assert not native.available() and "lacks AVX2" in native.info()
    finally:
        native.kernels.cache_clear()


@needs_native
def test_kernels_run_inside_torch_compile():
    raw = random_blocks(QT.Q4_0, 40, 64, seed=3)
    weight = native.NativeWeight(64, [(QT.Q4_0, formats.pack(QT.Q4_0, formats.unpack(QT.Q4_0, raw, 40, 64)))])
    x = torch.randn(3, 64)
    compiled = torch.compile(lambda t: native.matmul(t * 2, weight).relu(), fullgraph=True)
    assert torch.equal(compiled(x), weight.matmul(x * 2).relu())


def _mapped(address: int) -> bool:
    """Whether `address` lies in one of this process's mappings (Linux's /proc/self/maps)."""
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= address < hi:
                return True
    return False


@pytest.mark.skipif(not (native.maps_supported() and os.path.exists("/proc/self/maps")),
                    reason="needs private anonymous maps and /proc/self/maps")
def test_weight_arena_copies_aligns_and_unmaps_with_its_last_tensor():
    arena = native.WeightArena()
    arena.CHUNK = 4 << 20  # (256 MiB in use)
    a = torch.arange(1000, dtype=torch.int16)
    b = torch.randn(3, 7)
    pa, pb = arena.place(a), arena.place(b)
    assert torch.equal(pa, a) and torch.equal(pb, b) and pa.data_ptr() != a.data_ptr()
    assert pa.data_ptr() % native.HUGE_PAGE == 0  # a fresh map starts on a huge-page boundary
    assert pb.data_ptr() == pa.data_ptr() + 2048  # then load order, 64-byte aligned
    for t in (torch.empty(0), torch.randn(4, 4).T):  # nothing to copy; not contiguous: left as they are
        assert arena.place(t) is t
    rest = torch.ones(arena.CHUNK - 2048 - 64, dtype=torch.uint8)  # does not fit the first map's tail
    prest = arena.place(rest)
    assert prest.data_ptr() % native.HUGE_PAGE == 0 and torch.equal(prest, rest)
    big = torch.full((arena.CHUNK + 1,), 7, dtype=torch.uint8)  # bigger than a chunk: a map of its size
    pbig = arena.place(big)
    assert pbig.data_ptr() % native.HUGE_PAGE == 0 and torch.equal(pbig, big)
    first, second = pa.data_ptr(), prest.data_ptr()
    del pa, pb, prest
    assert not _mapped(first) and not _mapped(second)  # a map goes with the last tensor in it
    assert _mapped(pbig.data_ptr())  # (the arena's own reference keeps the map it is filling)


@needs_native
def test_native_weights_live_in_the_arena_and_a_refused_one_takes_none_of_it():
    raw = random_blocks(QT.Q4_K, 16, 256, seed=1)
    bufs = formats.pack(QT.Q4_K, formats.unpack(QT.Q4_K, raw, 16, 256))
    weight = native.NativeWeight(256, [(QT.Q4_K, bufs)])
    placed = weight.parts[0][1]
    assert all(torch.equal(placed[k], bufs[k]) for k in bufs)
    if native.maps_supported():
        assert placed["q"].data_ptr() != bufs["q"].data_ptr()
        used = native._ARENA._used
        with pytest.raises(ValueError, match="refused"):
            native.NativeWeight(288, [(QT.Q4_K, bufs)])
        assert native._ARENA._used == used
    x = torch.randn(3, 256)
    assert torch.equal(weight.matmul(x), native.NativeWeight(256, [(QT.Q4_K, bufs)]).matmul(x))
