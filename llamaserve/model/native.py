"""Our int4/int8 CPU matmul kernels (kernels.c), compiled on first use with the system C compiler.

They quantize the activations to int8 in blocks of 32 and multiply with integer dot products, as GGML
does; torch's `_weight_int4pack_mm_for_cpu` has no such path on AVX2 and is 2-3x slower at batch 1.
Where the CPU lacks AVX2/FMA/F16C, no compiler is found, the build fails, or LLAMASERVE_NATIVE=0,
`available()` is False and the layers use torch's kernels instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
GROUP = 32
_SOURCE = Path(__file__).with_name("kernels.c")
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]


def _cpu_ok() -> bool:
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), "").split()
    except OSError:
        return False
    return {"avx2", "fma", "f16c"} <= set(flags)


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llamaserve"


def _build() -> Path:
    """Compile kernels.c once per source version into the user's cache (atomic rename: safe to race)."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise OSError(f"no C compiler ({cc!r})")
    tag = hashlib.sha256(_SOURCE.read_bytes() + " ".join([cc, *_FLAGS]).encode()).hexdigest()[:16]
    out_dir = _cache_dir()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(out_dir, os.W_OK | os.X_OK):
            raise PermissionError(f"{out_dir} is not writable")
    except OSError:
        out_dir = Path(tempfile.gettempdir()) / f"llamaserve-{os.getuid()}"
        out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"kernels-{tag}.so"
    if target.exists():
        return target
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *_FLAGS, "-o", tmp, str(_SOURCE)], capture_output=True, text=True,
                              timeout=120)
        if proc.returncode != 0:
            raise OSError(f"{cc} failed: {proc.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def _lib() -> ctypes.CDLL | None:
    if os.environ.get("LLAMASERVE_NATIVE", "1") == "0":
        return None
    if not _cpu_ok():
        log.info("native int4/int8 kernels need an x86-64 CPU with AVX2, FMA and F16C: using torch's")
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("native int4/int8 kernels unavailable (%s): using torch's, which are slower", exc)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.ls_q4_linear.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, ptr]
    lib.ls_q8_linear.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr]
    lib.ls_decode_layers.argtypes = [ptr, ctypes.c_float, ptr, ptr, ptr, ptr, ptr, ptr, ptr]
    lib.ls_q4_linear.restype = lib.ls_q8_linear.restype = lib.ls_decode_layers.restype = ctypes.c_int
    return lib


def available() -> bool:
    return _lib() is not None


def _interleave(values: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [N / 8, K / 32, 8 chunks, 8 rows, 4]: 4 consecutive values of 8 rows at a time."""
    n, k = values.shape
    return values.view(n // 8, 8, k // GROUP, 8, 4).permute(0, 2, 3, 1, 4)


def _deinterleave(chunks: torch.Tensor) -> torch.Tensor:
    """The inverse of _interleave: [N / 8, K / 32, 8, 8, 4] -> [N, K]."""
    g, nb = chunks.shape[:2]
    return chunks.permute(0, 3, 1, 2, 4).reshape(g * 8, nb * GROUP)


def _group_scales(s: torch.Tensor) -> torch.Tensor:
    """Per-row, per-block [N, K / 32] -> [N / 8, K / 32, 8] float16 (8 rows' scales side by side)."""
    n, nb = s.shape
    return s.to(torch.float16).view(n // 8, 8, nb).transpose(1, 2).contiguous()


def _ungroup_scales(s: torch.Tensor) -> torch.Tensor:
    return s.transpose(1, 2).reshape(-1, s.shape[1])


def supports(out_features: int, in_features: int) -> bool:
    """Shapes our kernels take: rows in groups of 8, blocks of 32 values."""
    return out_features % 8 == 0 and in_features % GROUP == 0


def pack_q4(
    q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Values 0..15 [N, K] with w = d * q + m per block ([N, K / 32] each) -> the kernel's layout.

    m None means m = -8 d (GGUF Q4_0): no m is stored (an empty tensor), 2 bytes a block saved."""
    t = _interleave(q.to(torch.uint8))
    qs = (t[:, :, :4] | (t[:, :, 4:] << 4)).contiguous()  # [N / 8, K / 32, 4, 8, 4]: 128 bytes a block
    ms = torch.empty(0, dtype=torch.float16) if m is None else _group_scales(m)
    return qs.view(qs.shape[0], qs.shape[1], 128), _group_scales(d), ms


def dequantize_q4(qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The float32 [N, K] weight that pack_q4's output stands for."""
    t = qs.view(qs.shape[0], qs.shape[1], 4, 8, 4)
    q = _deinterleave(torch.cat([t & 0x0F, t >> 4], dim=2))
    n, k = q.shape
    scale = _ungroup_scales(d).float()
    zero = -8 * scale if m.numel() == 0 else _ungroup_scales(m).float()
    return (q.float().view(n, -1, GROUP) * scale[..., None] + zero[..., None]).view(n, k)


def quantize_q8(w: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> int8 values and float16 scales in the kernel's layout, w ~= q * d per block of 32."""
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.int8)
    d = torch.empty(n, k // GROUP, dtype=torch.float16)
    for start in range(0, n, chunk):  # a float32 copy of one chunk at a time, not of a whole head
        blocks = w[start : start + chunk].float().view(-1, k // GROUP, GROUP)
        # Round the scale up to float16 first and quantize with the rounded value, so |q| <= 127.
        scale = (blocks.abs().amax(-1) / 127 * (1 + 2**-9)).clamp(min=torch.finfo(torch.float16).tiny)
        scale = scale.to(torch.float16)
        q[start : start + chunk] = (blocks / scale.float()[..., None]).round().clamp(-127, 127) \
            .to(torch.int8).view(-1, k)
        d[start : start + chunk] = scale
    packed = _interleave(q).contiguous()
    return packed.view(n // 8, k // GROUP, 256), _group_scales(d)


def dequantize_q8(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The float32 [N, K] weight that quantize_q8's output stands for."""
    values = _deinterleave(q.view(q.shape[0], q.shape[1], 8, 8, 4))
    n, k = values.shape
    return (values.float().view(n, -1, GROUP) * _ungroup_scales(d).float()[..., None]).view(n, k)


def _require() -> ctypes.CDLL:
    lib = _lib()
    if lib is None:  # the layers check available() when they choose their format
        raise RuntimeError("native kernels are not available on this machine")
    return lib


def _check_shapes(x: torch.Tensor, w: torch.Tensor, n: int) -> None:
    # The C side trusts its sizes: a mismatch here would read out of bounds, so it is checked.
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != w.shape[1] * GROUP:
        raise ValueError(f"native linear: x {tuple(x.shape)} {x.dtype} does not fit a [{n}, "
                         f"{w.shape[1] * GROUP}] weight")


def _check(rc: int) -> None:
    if rc != 0:
        raise MemoryError("native kernel: could not allocate its scratch buffers")


def q4_linear(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32 -> [M, N] float32, W from pack_q4 (see kernels.c)."""
    lib = _require()
    x = x.contiguous()
    n = qs.shape[0] * 8
    _check_shapes(x, qs, n)
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    _check(lib.ls_q4_linear(x.data_ptr(), x.shape[0], x.shape[1], qs.data_ptr(), d.data_ptr(),
                            m.data_ptr() if m.numel() else None, n, y.data_ptr()))
    return y


def q8_linear(x: torch.Tensor, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32 -> [M, N] float32, W from quantize_q8 (see kernels.c)."""
    lib = _require()
    x = x.contiguous()
    n = q.shape[0] * 8
    _check_shapes(x, q, n)
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    _check(lib.ls_q8_linear(x.data_ptr(), x.shape[0], x.shape[1], q.data_ptr(), d.data_ptr(), n,
                            y.data_ptr()))
    return y


# torch.compile sees the kernels as opaque ops (a ctypes call inside a graph would break it).
@torch.library.custom_op("llamaserve::q4_linear", mutates_args=())
def _q4_op(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return q4_linear(x, qs, d, m)


@_q4_op.register_fake
def _(x, qs, d, m):  # noqa: ANN001, ANN202
    return x.new_empty(x.shape[0], qs.shape[0] * 8, dtype=torch.float32)


@torch.library.custom_op("llamaserve::q8_linear", mutates_args=())
def _q8_op(x: torch.Tensor, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return q8_linear(x, q, d)


@_q8_op.register_fake
def _(x, q, d):  # noqa: ANN001, ANN202
    return x.new_empty(x.shape[0], q.shape[0] * 8, dtype=torch.float32)


def linear_q4(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return _q4_op(x, qs, d, m)
    return q4_linear(x, qs, d, m)


def linear_q8(x: torch.Tensor, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return _q8_op(x, q, d)
    return q8_linear(x, q, d)


def _linear_entry(module: Any) -> list[int] | None:  # an Int4Linear or Int8Linear
    """(kind, q, d, m) pointers of a layer that runs on our kernels, else None."""
    if not getattr(module, "native", False):
        return None
    if hasattr(module, "qs"):  # Int4Linear
        return [1, module.qs.data_ptr(), module.d.data_ptr(), module.m.data_ptr() if module.m.numel() else 0]
    return [0, module.qweight.data_ptr(), module.scales.data_ptr(), 0]  # Int8Linear


class FusedDecoder:
    """Runs every transformer layer of a decode step (one new token per sequence) in one C call.

    Used where all of a model's layer matmuls run on our kernels and activations and KV cache are
    float32 (the int4/int8 CPU paths); prefill steps keep the torch path. `for_model` returns None
    for any other model. It keeps the addresses of the model's norm weights and quantized buffers:
    the model must not be moved or converted (`.to()`, `.float()`, a new state dict) afterwards.
    """

    def __init__(self, model: Any, entries: list[list[int]]) -> None:  # a Transformer
        cfg = model.config
        self.model = model
        self.entries = entries  # per layer: norms, then the 4 linears (the pool pointer is added per cache)
        self.shape: tuple[int, ...] = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                      cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size)
        self.eps = float(cfg.rms_norm_eps)
        self._table: tuple[tuple[int, ...], torch.Tensor] | None = None  # (pool pointers, pointer table)

    @classmethod
    def for_model(cls, model: Any) -> FusedDecoder | None:
        cfg = model.config
        if not available() or getattr(model, "act_dtype", None) != torch.float32:
            return None
        if cfg.head_dim > 512 or cfg.head_dim % 2 or cfg.num_attention_heads % cfg.num_key_value_heads:
            return None
        entries = []
        for layer in model.layers:
            norms = (layer.attention_norm.weight, layer.ffn_norm.weight)
            if any(w.dtype != torch.float32 or not w.is_contiguous() for w in norms):
                return None
            row = [norms[0].data_ptr(), norms[1].data_ptr()]
            for module in (layer.attention.wqkv, layer.attention.wo, layer.feed_forward.w13,
                           layer.feed_forward.w2):
                entry = _linear_entry(module)
                if entry is None:
                    return None
                row += entry
            entries.append(row)
        return cls(model, entries)

    def _pointers(self, pools: list[torch.Tensor]) -> torch.Tensor:
        key = tuple(p.data_ptr() for p in pools)
        if self._table is None or self._table[0] != key:
            if any(p.dtype != torch.float32 or not p.is_contiguous() or p.is_cuda for p in pools):
                raise ValueError("fused decode needs contiguous float32 CPU KV pools (the model's dtype)")
            rows = [[pool, *entry] for pool, entry in zip(key, self.entries, strict=True)]
            self._table = (key, torch.tensor(rows, dtype=torch.int64))
        return self._table[1]

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slot_mapping: torch.Tensor,
            ctx_slots: torch.Tensor, ctx_lens: torch.Tensor, pools: list[torch.Tensor]) -> torch.Tensor:
        """x [B, hidden] float32 (one token per sequence) -> the hidden states after the last layer."""
        layers, dim, heads, kv_heads, head_dim, inter = self.shape
        B = x.shape[0]
        x = x.contiguous().clone()
        cos, sin = cos.reshape(B, head_dim).contiguous(), sin.reshape(B, head_dim).contiguous()
        slots = slot_mapping.to(torch.int64).contiguous()
        ctx = ctx_slots.to(torch.int64).contiguous()
        lens = ctx_lens.to(torch.int64).contiguous()
        if (x.dtype != torch.float32 or cos.dtype != torch.float32 or x.shape[1] != dim
                or slots.shape[0] != B or ctx.shape[0] != B or lens.shape[0] != B):
            raise ValueError("fused decode: inputs do not match the model")
        sizes = [layers, B, dim, heads, kv_heads, head_dim, inter, ctx.shape[1]]
        cfg = torch.tensor(sizes, dtype=torch.int64)
        table = self._pointers(pools)
        _check(_require().ls_decode_layers(cfg.data_ptr(), self.eps, x.data_ptr(), cos.data_ptr(),
                                           sin.data_ptr(), slots.data_ptr(), ctx.data_ptr(), lens.data_ptr(),
                                           table.data_ptr()))
        return x
