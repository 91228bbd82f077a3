"""Quantized layers: GGUF weights in their own type on our kernels (GGUFLinear, QuantizedEmbedding), and
the int4 / int8 layers of torch's kernels (Int4Linear for GGUF Q4_0 / Q4_1, Int8Linear for any weight)."""

from __future__ import annotations

import functools
import mmap
from collections.abc import Callable
from dataclasses import dataclass

import gguf.quants
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize as gguf_dequantize
from torch import nn

from llamaserve.model import formats, native
from llamaserve.sysmem import drop_mapped_pages, file_map

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
    """y = x @ W.T with W kept 4-bit (group size 32, a scale and a zero per group) for torch's
    `_weight_int4pack_mm_for_cpu`, inputs cast to `dtype` (bfloat16: its float32 path is ~10x slower).
    Used where our kernels are unavailable (GGUFLinear runs GGUF's Q4 blocks where they are)."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        super().__init__()
        if in_features % GROUP:
            raise ValueError(f"int4 weights need in_features divisible by {GROUP}, got {in_features}")
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self._pending: Q4Weight | None = None  # staging for the rows loaded so far (allocated on first use)
        self._rows_loaded = 0
        self.register_buffer("packed", torch.empty(0, dtype=torch.uint8), persistent=False)
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
            self.packed = torch._convert_weight_to_int4pack_for_cpu(p.q.to(torch.int32), 8)
            sz = torch.stack([p.scale, p.zero], dim=-1).transpose(0, 1)  # [K / 32, N, 2]
            self.scales_zeros = sz.contiguous().to(self.dtype)
            self._pending = None

    @property
    def loaded(self) -> bool:
        return self.packed.numel() > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = torch._weight_int4pack_mm_for_cpu(flat.to(self.dtype), self.packed, GROUP, self.scales_zeros)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


@dataclass(slots=True)
class RawTensor:
    """A GGUF tensor's blocks as the file has them: [rows, row bytes] uint8 in `qtype`.

    `data` may be a read-only map of the file (the loader's token embedding): readers never write it."""

    qtype: QT
    data: np.ndarray  # uint8 [rows, row bytes]
    cols: int

    @property
    def rows(self) -> int:
        return int(self.data.shape[0])

    def dequantize(self) -> torch.Tensor:
        return torch.from_numpy(gguf_dequantize(self.data, self.qtype).reshape(self.rows, self.cols))


PACK_ROWS = 2048  # rows unpacked and packed at once (a 32,000-row Q6_K head at once peaked 2.8 GB higher)


class GGUFLinear(nn.Module):
    """y = x @ W.T on our kernels, W in the GGUF type of each of its source tensors (a fused q/k/v keeps
    Q6_K v rows beside Q4_K q and k rows). Outputs come back in the caller's dtype."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._pieces: dict[int, tuple[QT, dict[str, torch.Tensor]]] = {}  # first row -> packed rows
        self._rows_loaded = 0
        self.native_weight: native.NativeWeight | None = None

    def load_rows(self, start: int, t: RawTensor) -> None:
        """Pack rows [start, start + n); once every row is in, join same-type neighbours into parts."""
        if t.cols != self.in_features:
            raise ValueError(f"rows of {t.cols} values for a linear of {self.in_features} inputs")
        for r in range(0, t.rows, PACK_ROWS):  # a slice at a time: the unpacking's temporaries stay small
            rows = t.data[r : r + PACK_ROWS]
            unpacked = formats.unpack(t.qtype, rows, rows.shape[0], t.cols)
            self._pieces[start + r] = (t.qtype, formats.pack(t.qtype, unpacked))
        self._rows_loaded += t.rows
        if self._rows_loaded < self.out_features:
            return
        parts: list[tuple[QT, dict[str, torch.Tensor]]] = []
        runs: list[tuple[QT, list[dict[str, torch.Tensor]]]] = []  # neighbours of one type
        for _, (qtype, bufs) in sorted(self._pieces.items()):
            if runs and runs[-1][0] == qtype:
                runs[-1][1].append(bufs)
            else:
                runs.append((qtype, [bufs]))
        for qtype, pieces in runs:
            joined = {k: torch.cat([p[k] for p in pieces]) if pieces[0][k].numel() else pieces[0][k]
                      for k in pieces[0]}
            parts.append((qtype, joined))
        self._pieces = {}
        self.native_weight = native.NativeWeight(self.in_features, parts)

    @property
    def loaded(self) -> bool:
        return self.native_weight is not None

    def extra_repr(self) -> str:
        types = self.native_weight.types() if self.native_weight else "not loaded"
        return f"in_features={self.in_features}, out_features={self.out_features}, types={types}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native_weight is None:
            raise RuntimeError("GGUFLinear used before its weights were loaded")
        y = native.matmul(x.reshape(-1, self.in_features), self.native_weight)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


@functools.cache
def rows_dequantizer(qtype: QT) -> Callable[[np.ndarray], np.ndarray]:
    """gguf's reference dequantization of whole rows of one type, applied to all of them at once (its
    dequantize() splits them into groups of 16 first, which costs more than the arithmetic for the few
    rows of a decode step); the same arithmetic."""
    rows_fn = getattr(getattr(gguf.quants, qtype.name, None), "dequantize_rows", None)
    return rows_fn or (lambda rows: gguf_dequantize(rows, qtype))


class QuantizedEmbedding(nn.Module):
    """Token embedding kept in its GGUF type; the rows a step looks up are dequantized (gguf's code).

    From a GGUF file the table is a read-only map of the file's bytes (loader.gguf.map_rows), none of it
    in our memory. Each lookup drops the pages it mapped: a fault maps a whole large page-cache folio, and
    a few hundred distinct tokens would otherwise keep nearly all of the table resident. Measured cost
    against a table in our memory: +0.03 ms for one token, +0.44 ms for 64, +0.86 ms for 512 on a 7B
    Q4_K table (74 MB); +0.05, +0.27, +1.3 ms on SmolLM2's Q8_0 one (29 MB).

    Rows once dequantized stay in a bounded float32 cache (ROW_CACHE_BYTES, first in first out): a decode
    step's lookup right after the layers had flushed the CPU caches took 0.22 ms for one token on
    SmolLM2 (the fault, the drop and gguf's numpy code), and 0.02 ms from the cache. The values are the
    same either way."""

    ROW_CACHE_BYTES = 16 << 20  # 7,281 rows of SmolLM2 (576 wide), 1,024 of Llama 2 7B (4,096 wide)

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.table: RawTensor | None = None
        self.file_map: mmap.mmap | None = None  # the map under table.data, when it is one
        self._reset_cache(0)  # (the rows' cache is allocated by load)

    def _reset_cache(self, cap: int) -> None:
        # [cap, dim] float32; its pages come into memory only as rows arrive
        self._cached = torch.empty(cap, self.embedding_dim, dtype=torch.float32, device="cpu")
        self._slot_of: dict[int, int] = {}  # token id -> its row in _cached
        self._owner: list[int | None] = [None] * cap  # token id in each row of _cached
        self._next = 0  # the row the next new token takes (first in, first out)

    def load(self, t: RawTensor) -> None:
        if (t.rows, t.cols) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"embedding of {t.rows} x {t.cols}, expected "
                             f"{self.num_embeddings} x {self.embedding_dim}")
        self.table, self.file_map = t, file_map(t.data)
        self._reset_cache(max(1, min(self.num_embeddings, self.ROW_CACHE_BYTES // (4 * self.embedding_dim))))

    def _dequantize(self, table: RawTensor, ids: list[int]) -> torch.Tensor:
        """[len(ids), dim] float32 from the table (gguf's dequantization); a negative or too large id is
        an IndexError, never another token's row."""
        if any(not 0 <= i < self.num_embeddings for i in ids):
            raise IndexError(f"token ids must be in 0..{self.num_embeddings - 1}")
        rows = table.data[np.asarray(ids, dtype=np.int64)]  # a copy of just these rows
        drop_mapped_pages(self.file_map)  # (a no-op for a table in our memory)
        return torch.from_numpy(rows_dequantizer(table.qtype)(rows).reshape(-1, self.embedding_dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.table
        if table is None:
            raise RuntimeError("QuantizedEmbedding used before its weights were loaded")
        flat: list[int] = ids.reshape(-1).tolist()
        slot_of, owner = self._slot_of, self._owner
        wanted = dict.fromkeys(flat)  # distinct ids, in order
        if len(wanted) > len(owner):  # more than the cache holds (a long prompt on a wide model)
            out = self._dequantize(table, flat)
        else:
            new = [i for i in wanted if i not in slot_of]
            if new:
                fresh = self._dequantize(table, new)
                slots = []
                for i in new:  # each takes the oldest row that no id of this lookup holds
                    while owner[self._next] in wanted:
                        self._next = (self._next + 1) % len(owner)
                    s, self._next = self._next, (self._next + 1) % len(owner)
                    if owner[s] is not None:
                        del slot_of[owner[s]]  # type: ignore[arg-type]
                    owner[s], slot_of[i] = i, s
                    slots.append(s)
                self._cached[slots] = fresh
            out = self._cached[[slot_of[i] for i in flat]]
        return out.view(*ids.shape, self.embedding_dim).to(ids.device)


class Int8Linear(nn.Module):
    """y = x @ W.T with W quantized to int8: per block of 32 with our native kernels (model/native.py),
    else per output row for torch's `_weight_int8pack_mm` (inputs cast to `dtype`)."""

    qweight: torch.Tensor  # torch's kernel: int8 [N, K] (ours keep Q8_0 blocks in native_weight)
    scales: torch.Tensor  # [N] in the activation dtype

    def __init__(self, w: torch.Tensor, dtype: torch.dtype, chunk: int = 4096) -> None:
        super().__init__()
        self.in_features, self.out_features, self.dtype = w.shape[1], w.shape[0], dtype
        self.native_weight: native.NativeWeight | None = None
        if native.available() and native.supports(self.out_features, self.in_features):  # Q8_0 blocks
            unpacked = formats.quantize_q8_0(w, chunk)
            parts = [(QT.Q8_0, formats.pack(QT.Q8_0, unpacked))]
            self.native_weight = native.NativeWeight(self.in_features, parts)
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

    @property
    def native(self) -> bool:
        return self.native_weight is not None

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [N, K] this layer multiplies by."""
        if self.native_weight is not None:
            return formats.dequantize(QT.Q8_0, formats.unpack_q8_0(self.native_weight.parts[0][1]))
        return self.qweight.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.native_weight is not None:
            y = native.matmul(flat, self.native_weight)
        else:
            y = torch._weight_int8pack_mm(flat.to(self.dtype), self.qweight, self.scales)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
