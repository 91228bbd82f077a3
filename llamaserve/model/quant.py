"""Weight-only int4 / int8 linear layers: GGUF Q4_0 / Q4_1 blocks stay 4-bit in memory (group size 32)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from torch import nn

from llamaserve.model import native

GROUP = 32
INT4_TYPES = frozenset({QT.Q4_0, QT.Q4_1})


@dataclass(slots=True)
class Q4Weight:
    """A 4-bit weight as the kernel wants it: w[n, k] = (q[n, k] - 8) * scale[n, g] + zero[n, g]."""

    q: torch.Tensor  # [N, K] uint8, values 0..15
    scale: torch.Tensor  # [N, K / 32] float32
    zero: torch.Tensor  # [N, K / 32] float32

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        groups = (self.q.float().view(self.q.shape[0], -1, GROUP) - 8) * self.scale[..., None]
        return (groups + self.zero[..., None]).view(self.q.shape)

    def permute_rows(self, fn) -> Q4Weight:  # noqa: ANN001 (a row permutation such as unpermute_qk)
        return Q4Weight(fn(self.q), fn(self.scale), fn(self.zero))


def q4_from_blocks(raw: np.ndarray, qtype: QT, rows: int, cols: int) -> Q4Weight:
    """Split raw GGUF Q4_0 / Q4_1 blocks into 4-bit values and per-group scale and zero (exact)."""
    blocks = np.ascontiguousarray(raw).view(np.uint8).reshape(rows * cols // GROUP, -1)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # [blocks, 1]
    if qtype == QT.Q4_1:
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        packed = blocks[:, 4:]
        zero = m + 8 * d  # w = d * q + m  ==  (q - 8) * d + (m + 8 d)
    else:
        packed = blocks[:, 2:]
        zero = np.zeros_like(d)  # w = d * (q - 8)
    # Low nibbles hold elements 0..15 of a block, high nibbles 16..31.
    q = np.concatenate([packed & 0x0F, packed >> 4], axis=1)  # [blocks, 32]
    return Q4Weight(
        torch.from_numpy(q.reshape(rows, cols)),
        torch.from_numpy(d.reshape(rows, cols // GROUP)),
        torch.from_numpy(zero.reshape(rows, cols // GROUP)),
    )


class CastLinear(nn.Linear):
    """A dense linear whose weight is stored in another dtype than the activations (cast in and out)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)


class Int4Linear(nn.Module):
    """y = x @ W.T with W kept 4-bit (group size 32, a scale and a zero per group).

    With our native kernels (model/native.py) the weight keeps GGUF's block layout and the activations
    are quantized to int8 per block of 32; otherwise torch's `_weight_int4pack_mm_for_cpu` runs, with
    inputs cast to `dtype` (bfloat16: its float32 path is ~10x slower). Outputs come back in the
    caller's dtype.
    """

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        super().__init__()
        if in_features % GROUP:
            raise ValueError(f"int4 weights need in_features divisible by {GROUP}, got {in_features}")
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self.native = native.available() and native.supports(out_features, in_features)
        self._pending: Q4Weight | None = None  # staging for the rows loaded so far (allocated on first use)
        self._rows_loaded = 0
        # torch's format: packed (int4pack) and scales_zeros; ours: qs (nibbles), d and m (float16; m
        # empty for Q4_0, whose m is -8 d).
        for name in ("packed", "qs", "d", "m"):
            self.register_buffer(name, torch.empty(0, dtype=torch.uint8), persistent=False)
        self.register_buffer("scales_zeros", torch.empty(0, dtype=dtype), persistent=False)

    def load_rows(self, start: int, w: Q4Weight) -> None:
        """Stage rows [start, start + n); once every row is in, pack and drop the staging copy."""
        end = start + w.q.shape[0]
        if self._pending is None:
            n, k = self.out_features, self.in_features
            self._pending = Q4Weight(torch.zeros(n, k, dtype=torch.uint8), torch.zeros(n, k // GROUP),
                                     torch.zeros(n, k // GROUP))
        self._pending.q[start:end] = w.q
        self._pending.scale[start:end] = w.scale
        self._pending.zero[start:end] = w.zero
        self._rows_loaded += end - start
        if self._rows_loaded == self.out_features:
            p = self._pending
            if self.native:  # w = d * q + m
                q4_0 = not bool(p.zero.any())  # w = d * (q - 8): m = -8 d is implied, not stored
                self.qs, self.d, self.m = native.pack_q4(p.q, p.scale, None if q4_0 else p.zero - 8 * p.scale)
            else:
                self.packed = torch._convert_weight_to_int4pack_for_cpu(p.q.to(torch.int32), 8)
                sz = torch.stack([p.scale, p.zero], dim=-1).transpose(0, 1)  # [K / 32, N, 2]
                self.scales_zeros = sz.contiguous().to(self.dtype)
            self._pending = None

    @property
    def loaded(self) -> bool:
        return (self.qs if self.native else self.packed).numel() > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.native:
            y = native.linear_q4(flat.float(), self.qs, self.d, self.m)
        else:
            y = torch._weight_int4pack_mm_for_cpu(flat.to(self.dtype), self.packed, GROUP, self.scales_zeros)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


class Int8Linear(nn.Module):
    """y = x @ W.T with W quantized to int8: per block of 32 with our native kernels (model/native.py),
    else per output row for torch's `_weight_int8pack_mm` (inputs cast to `dtype`)."""

    qweight: torch.Tensor  # int8: native [N / 8, K / 32, 256] (native.quantize_q8), torch [N, K]
    scales: torch.Tensor  # native: [N / 8, K / 32, 8] float16; torch: [N] in the activation dtype

    def __init__(self, w: torch.Tensor, dtype: torch.dtype, chunk: int = 4096) -> None:
        super().__init__()
        self.in_features, self.out_features, self.dtype = w.shape[1], w.shape[0], dtype
        self.native = native.available() and native.supports(self.out_features, self.in_features)
        if self.native:
            qweight, scales = native.quantize_q8(w, chunk)
            self.register_buffer("qweight", qweight, persistent=False)
            self.register_buffer("scales", scales, persistent=False)
            return
        qweight = torch.empty(w.shape, dtype=torch.int8)
        scales = torch.empty(w.shape[0])
        for start in range(0, w.shape[0], chunk):  # a float32 copy of a chunk at a time, not the whole head
            rows = w[start : start + chunk].float()
            # The kernel takes scales in the activation dtype: round them up to it first and quantize
            # with the rounded value, so every row keeps |q| <= 127 and a half-step error at most.
            # (Clamped to the dtype's smallest normal number: all-zero rows, and no float16 subnormals.)
            scale = (rows.abs().amax(-1) / 127 * (1 + 2**-7)).clamp(min=torch.finfo(dtype).tiny)
            scale = scale.to(dtype).float()
            qweight[start : start + chunk] = (rows / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
            scales[start : start + chunk] = scale
        self.register_buffer("qweight", qweight, persistent=False)
        self.register_buffer("scales", scales.to(dtype), persistent=False)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [N, K] this layer multiplies by."""
        if self.native:
            return native.dequantize_q8(self.qweight, self.scales)
        return self.qweight.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.native:
            y = native.linear_q8(flat.float(), self.qweight, self.scales)
        else:
            y = torch._weight_int8pack_mm(flat.to(self.dtype), self.qweight, self.scales)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
