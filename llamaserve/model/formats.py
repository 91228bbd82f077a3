"""GGUF weight blocks -> the integer values and scales they hold -> the layout of our kernels (csrc/gemm.c).

Every conversion is exact: the kernels see GGUF's own values, scales and mins, re-laid out in groups of 8
rows so that one vector holds 4 consecutive values of 8 rows. The unpacking follows gguf's reference
dequantization (gguf.quants) step for step, stopping before the float multiplication.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

GROUP = 32


@dataclass(frozen=True, slots=True)
class Format:
    """How a GGUF type's values read: w = scale * (u - zp) + min per sub-block (see csrc/gemm.c)."""

    code: int  # the format number in the C ABI (ls.h)
    hi_planes: int  # value bits above the low nibble: 0 (<= 4-bit), 1 (5-bit), 2 (6-bit)
    sub: int  # values per scale: 32, or 16 for Q2_K / Q3_K / Q6_K
    k_type: bool  # super-blocks of 256: float16 d (and dmin) per super-block, integer sub-scales
    has_min: bool
    zp: int


FORMATS: dict[QT, Format] = {
    QT.Q4_0: Format(1, 0, 32, False, False, 8),
    QT.Q4_1: Format(2, 0, 32, False, True, 0),
    QT.Q5_0: Format(3, 1, 32, False, False, 16),
    QT.Q5_1: Format(4, 1, 32, False, True, 0),
    QT.Q8_0: Format(5, 0, 32, False, False, 0),  # int8 values, their own layout
    QT.Q2_K: Format(6, 0, 16, True, True, 0),
    QT.Q3_K: Format(7, 0, 16, True, False, 4),
    QT.Q4_K: Format(8, 0, 32, True, True, 0),
    QT.Q5_K: Format(9, 1, 32, True, True, 0),
    QT.Q6_K: Format(10, 2, 16, True, False, 32),
}


@dataclass(slots=True)
class Unpacked:
    """A [rows, cols] weight as integers: values u, and per row float16 d (m) per block or super-block,
    int8 sc (mn) per sub-block for K types."""

    u: np.ndarray  # uint8 (int8 for Q8_0) [rows, cols]
    d: np.ndarray  # float16 [rows, blocks or super-blocks]
    m: np.ndarray | None  # float16, like d: Q4_1 / Q5_1 mins, K types' dmin
    sc: np.ndarray | None = None  # int8 [rows, sub-blocks]
    mn: np.ndarray | None = None


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16)[:, 0]


def _k4_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: 8 six-bit scales and mins packed in 12 bytes (gguf's Q4_K.get_scale_min)."""
    s = scales.reshape(-1, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _bits(a: np.ndarray, shifts: list[int], mask: int, shape: tuple[int, ...]) -> Any:
    """a [n, 1?, x] >> each shift & mask, in gguf's order (shift index before byte index)."""
    s = np.array(shifts, dtype=np.uint8).reshape(1, 1, len(shifts), 1)
    return ((a[:, :, None, :] >> s) & np.uint8(mask)).reshape(shape)


def unpack(qtype: QT, raw: np.ndarray, rows: int, cols: int) -> Unpacked:
    """Raw GGUF blocks (any uint8 view of a [rows, cols] tensor) -> its integer values and scales."""
    if qtype not in FORMATS:
        raise ValueError(f"no block format for {qtype.name}")
    bs, ts = GGML_QUANT_SIZES[qtype]
    b = np.ascontiguousarray(raw).view(np.uint8).reshape(-1, ts)
    n = b.shape[0]
    if n * bs != rows * cols:
        raise ValueError(f"{qtype.name} data holds {n * bs} values, not {rows} x {cols}")
    nib = [0, 4]
    u: Any  # uint8 values (int8 for Q8_0)
    if qtype in (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1):
        off = 4 if qtype in (QT.Q4_1, QT.Q5_1) else 2
        m = _f16(b[:, 2:4]) if off == 4 else None
        if qtype in (QT.Q5_0, QT.Q5_1):
            qh32 = b[:, off : off + 4].copy().view(np.uint32)  # [n, 1]: bit i is bit 4 of value i
            hbit = ((qh32 >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
            off += 4
        else:
            hbit = np.zeros((n, 32), np.uint8)
        u = _bits(b[:, None, off:], nib, 0x0F, (n, 32)) | (hbit << 4)
        return Unpacked(u.reshape(rows, cols), _f16(b[:, :2]).reshape(rows, -1),
                        None if m is None else m.reshape(rows, -1))
    if qtype == QT.Q8_0:
        return Unpacked(b[:, 2:].view(np.int8).reshape(rows, cols), _f16(b[:, :2]).reshape(rows, -1), None)
    if qtype == QT.Q2_K:
        scales, qs, d, dmin = b[:, :16], b[:, 16:80], b[:, 80:82], b[:, 82:84]
        u = _bits(qs.reshape(n, 2, 32), [0, 2, 4, 6], 3, (n, 256))
        sc, mn = (scales & 0x0F).view(np.int8), (scales >> 4).view(np.int8)
        dm = _f16(dmin)
    elif qtype == QT.Q3_K:
        hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108], b[:, 108:110]
        low = _bits(qs.reshape(n, 2, 32), [0, 2, 4, 6], 3, (n, 256))
        high = _bits(hmask.reshape(n, 1, 32), list(range(8)), 1, (n, 256))
        u = low | (high << 2)  # gguf: q = low - 4 (1 - high), so u = q + 4 in 0..7, zero point 4
        lsc = _bits(scales[:, None, :8], nib, 0x0F, (n, 16))
        hsc = _bits(scales[:, None, 8:12], [0, 2, 4, 6], 3, (n, 16))
        sc, mn, dm = ((lsc | (hsc << 4)).astype(np.int16) - 32).astype(np.int8), None, None
    elif qtype in (QT.Q4_K, QT.Q5_K):
        d, dmin, scales = b[:, :2], b[:, 2:4], b[:, 4:16]
        sc8, mn8 = _k4_scale_min(scales)
        sc, mn, dm = sc8.view(np.int8), mn8.view(np.int8), _f16(dmin)
        qs = b[:, 16:144] if qtype == QT.Q4_K else b[:, 48:176]
        u = _bits(qs.reshape(n, 4, 32), nib, 0x0F, (n, 256))
        if qtype == QT.Q5_K:
            u = u | (_bits(b[:, None, 16:48], list(range(8)), 1, (n, 256)) << 4)
    else:  # Q6_K
        ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], b[:, 208:210]
        u = _bits(ql.reshape(n, 2, 64), nib, 0x0F, (n, 256)) | (
            _bits(qh.reshape(n, 2, 32), [0, 2, 4, 6], 3, (n, 256)) << 4)
        sc, mn, dm = scales.view(np.int8), None, None
    return Unpacked(u.reshape(rows, cols), _f16(d).reshape(rows, -1),
                    None if dm is None else dm.reshape(rows, -1),
                    np.ascontiguousarray(sc).reshape(rows, -1), None if mn is None else
                    np.ascontiguousarray(mn).reshape(rows, -1))


def dequantize(qtype: QT, w: Unpacked) -> torch.Tensor:
    """The float32 [rows, cols] weight that `w` stands for (GGUF's formula)."""
    f = FORMATS[qtype]
    rows, cols = w.u.shape
    v = torch.from_numpy(np.ascontiguousarray(w.u, dtype=np.float32)).view(rows, -1, f.sub)
    d = torch.from_numpy(w.d.astype(np.float32))
    m = None if w.m is None else torch.from_numpy(w.m.astype(np.float32))
    if f.k_type:
        per = 256 // f.sub  # sub-blocks per super-block
        scale = d.repeat_interleave(per, 1) * torch.from_numpy(w.sc.astype(np.float32))  # type: ignore[union-attr]
        low = None if m is None else -m.repeat_interleave(per, 1) * torch.from_numpy(w.mn.astype(np.float32))  # type: ignore[union-attr]
    else:
        scale, low = d, m
    out = scale[..., None] * (v - f.zp)
    if low is not None:
        out = out + low[..., None]
    return out.view(rows, cols)


def _interleave(values: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [N / 8, K / 32, 8 chunks, 8 rows, 4]: 4 consecutive values of 8 rows at a time."""
    n, k = values.shape
    return values.view(n // 8, 8, k // GROUP, 8, 4).permute(0, 2, 3, 1, 4)


def _per_group(s: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Per-row [N, X] -> [N / 8, X, 8]: 8 rows' numbers side by side."""
    t = torch.from_numpy(np.ascontiguousarray(s))
    n, x = t.shape
    return t.view(dtype).view(n // 8, 8, x).transpose(1, 2).contiguous()


def pack(qtype: QT, w: Unpacked) -> dict[str, torch.Tensor]:
    """The kernel's buffers for one stack of rows (names as in ls_part; empty tensors where unused)."""
    f = FORMATS[qtype]
    u = torch.from_numpy(np.ascontiguousarray(w.u))
    n, k = u.shape
    empty = torch.empty(0, dtype=torch.uint8)
    if qtype == QT.Q8_0:
        q = _interleave(u).contiguous().view(n // 8, k // GROUP, 256)
    else:
        t = _interleave(u & 0x0F)
        q = (t[:, :, :4] | (t[:, :, 4:] << 4)).contiguous().view(n // 8, k // GROUP, 128)
    hi = empty
    if f.hi_planes == 1:  # byte [r][e], bit c = bit 4 of value 4c + e
        bits = _interleave((u >> 4) & 1)  # [G, nb, 8 c, 8 r, 4 e]
        hi = bits[:, :, 0].clone()
        for c in range(1, 8):
            hi |= bits[:, :, c] << c
        hi = hi.contiguous().view(n // 8, k // GROUP, 32)
    elif f.hi_planes == 2:  # vector h's byte [r][e], bits 2j..2j+1 = bits 4-5 of value 4 (4h + j) + e
        bits = _interleave((u >> 4) & 3).reshape(n // 8, k // GROUP, 2, 4, 8, 4)
        hi = bits[:, :, :, 0].clone()
        for j in range(1, 4):
            hi |= bits[:, :, :, j] << (2 * j)
        hi = hi.contiguous().view(n // 8, k // GROUP, 64)
    out = {
        "q": q,
        "hi": hi,
        "d": _per_group(w.d, torch.float16),
        "m": empty if w.m is None else _per_group(w.m, torch.float16),
        "sc": empty, "mn": empty,
    }
    if f.k_type and f.has_min and f.sub == GROUP:  # Q4_K, Q5_K: 6-bit scale and min, 16 bytes a block
        if w.sc is None or w.mn is None:
            raise ValueError(f"{qtype.name} weights without their scales and mins")
        out["sc"] = _pack_scale_min(_per_group(w.sc, torch.int8), _per_group(w.mn, torch.int8))
    elif f.k_type:  # [N, nb * ns] -> [G, nb, ns, 8]
        ns = GROUP // f.sub
        for name in ("sc", "mn"):
            s = getattr(w, name)
            if s is not None:
                out[name] = _per_group(s, torch.int8).view(n // 8, k // GROUP, ns, 8).contiguous()
    return out


def _pack_scale_min(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Scales and mins [G, nb, 8 rows] (0..63) -> uint8 [G, nb, 16]: the 8 rows' scales, then their mins,
    a byte each (csrc/gemm.c). GGUF packs them in 12 bytes; decoding those took about a third of a
    one-row Q4_K matmul's time with the weights in cache (Zen 4), for 4 bytes a block of 8 rows saved."""
    if bool(((sc < 0) | (sc > 63) | (mn < 0) | (mn > 63)).any()):
        raise ValueError("K-type scales and mins must be 6-bit")
    return torch.cat([sc, mn], dim=-1).view(torch.uint8).contiguous()


def quantize_q8_0(w: torch.Tensor, chunk: int = 4096) -> Unpacked:
    """Any float [N, K] weight -> GGUF Q8_0 numbers (int8 per value, a float16 scale per block of 32)."""
    n, k = w.shape
    q = np.empty((n, k), dtype=np.int8)
    d = np.empty((n, k // GROUP), dtype=np.float16)
    for start in range(0, n, chunk):  # a float32 copy of one chunk at a time, not of a whole head
        blocks = w[start : start + chunk].float().view(-1, k // GROUP, GROUP)
        # Round the scale up to float16 first and quantize with the rounded value, so |q| <= 127.
        scale = (blocks.abs().amax(-1) / 127 * (1 + 2**-9)).clamp(min=torch.finfo(torch.float16).tiny)
        scale = scale.to(torch.float16)
        values = (blocks / scale.float()[..., None]).round().clamp(-127, 127).to(torch.int8)
        q[start : start + chunk] = values.view(-1, k).numpy()
        d[start : start + chunk] = scale.numpy()
    return Unpacked(q, d, None)


def unpack_q8_0(bufs: dict[str, torch.Tensor]) -> Unpacked:
    """The inverse of pack for Q8_0: the int8 values [N, K] and scales [N, K / 32] again."""
    g, nb = bufs["q"].shape[:2]
    q = bufs["q"].view(g, nb, 8, 8, 4).permute(0, 3, 1, 2, 4).reshape(g * 8, nb * GROUP)
    d = bufs["d"].transpose(1, 2).reshape(g * 8, nb)
    return Unpacked(q.contiguous().numpy(), d.contiguous().numpy(), None)
