"""The paged KV-cache pool and the per-step attention metadata that indexes it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from llamaserve.model import native

CTX_ALIGN = 32
# --kv-cache-dtype values (auto is resolved by the engine) and what a pool slot stores.
KV_DTYPES = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8,
}


@dataclass(slots=True)
class AttentionMetadata:
    """Where this step's tokens go in the pool and which cached slots each sequence attends to.

    T = tokens in the step, B = sequences, Q = longest query chunk, L = longest context.
    """

    slot_mapping: torch.Tensor  # [T] long: pool slot for each new token's K/V
    ctx_slots: torch.Tensor  # [B, L] long: pool slots of each sequence's context (padding: slot 0)
    mask: torch.Tensor | None  # [B, 1, Q, L] bool, True = attend; None when every query is 1 token
    q_dest: torch.Tensor | None  # [T] long: row of each token in the padded [B * Q] query; None if Q == 1
    num_seqs: int
    max_query_len: int
    ctx_lens: torch.Tensor  # [B] long: context length of each sequence, new tokens included
    q_lens: torch.Tensor  # [B] long: new tokens of each sequence in this step


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., D] float -> int8 values and a float32 scale per row (amax / 127, rounded half to even);
    the same arithmetic as the native store (attention.c), so both paths write identical pools."""
    x = x.float()
    amax = x.abs().amax(-1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(x * inv[..., None]).clamp(-127, 127).to(torch.int8)
    return q, amax / 127.0


class PagedKVCache:
    """One preallocated pool per layer, [num_blocks * block_size, 2 * kv_heads, head_dim]: a slot holds a
    token's keys (heads 0..kv_heads-1) then its values, so one write and one gather serve both.

    dtype: float32, bfloat16, float16, or int8 with a float32 scale per slot and head (`scales`). The
    pool is read in that dtype by every attention path: our kernels (`use_native`) convert as they go;
    torch's path runs attention in the pool's float dtype (int8: dequantized to bfloat16, or to the
    activations' 16-bit dtype), never on a float32 copy of a 16-bit context.
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        if dtype not in KV_DTYPES.values():
            raise ValueError(f"KV cache dtype must be one of {', '.join(KV_DTYPES)}, got {dtype}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        shape = (num_blocks * block_size, 2 * num_kv_heads, head_dim)
        # The OS commits a pool's pages as blocks are first written, so RSS grows with the tokens held,
        # not with the pool's size: on the CPU 2 MiB at a time, in maps advised for transparent huge pages
        # (native.empty_huge; decode attention over scattered blocks, embedded model's shapes, B = 16 / 64,
        # Zen 4, one process alternated: 0.89x the time). Every slot is written before it is read, except
        # slot 0, which pads each sequence's context row (masked, but 0 x NaN is NaN): it must hold zeros,
        # as a fresh map does (read, its untouched pages map the shared zero page, no memory).
        cpu = torch.device(device).type == "cpu"
        self.kv = [native.empty_huge(shape, dtype) if cpu else torch.empty(shape, dtype=dtype, device=device)
                   for _ in range(num_layers)]
        if not cpu:
            for pool in self.kv:
                pool[0].zero_()
        self.scales: list[torch.Tensor] | None = None
        if dtype == torch.int8:
            self.scales = [torch.zeros(shape[:2], dtype=torch.float32, device=device)
                           for _ in range(num_layers)]
        self.native: list[native.NativeKV] | None = None  # per layer, once use_native() ran

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    def use_native(self) -> list[native.NativeKV]:
        """Attend and store with our kernels from now on (CPU pools); returns the layers' NativeKV."""
        if self.native is None:
            self.native = [native.NativeKV(pool, None if self.scales is None else self.scales[i])
                           for i, pool in enumerate(self.kv)]
        return self.native

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """K and V of one token over all layers, int8's scales included."""
        per_head = head_dim * torch.empty((), dtype=dtype).element_size() + (4 if dtype == torch.int8 else 0)
        return 2 * num_layers * num_kv_heads * per_head

    def write(self, layer: int, slot_mapping: torch.Tensor, kv_new: torch.Tensor) -> None:
        """Store this step's keys and values [T, 2 * kv_heads, D] of one layer."""
        if self.native is not None:
            native.kv_store(self.native[layer], kv_new, slot_mapping)
            return
        if self.scales is not None:
            q, scale = quantize_int8(kv_new)
            self.kv[layer].index_copy_(0, slot_mapping, q)
            self.scales[layer].index_copy_(0, slot_mapping, scale)
        else:
            self.kv[layer].index_copy_(0, slot_mapping, kv_new.to(self.dtype))

    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Causal attention of this step's queries q [T, H, D] over each sequence's context: [T, H * D]
        in q's dtype."""
        T, H, D = q.shape
        if self.native is not None:
            out = native.attention(self.native[layer], q, meta.q_lens, meta.ctx_slots, meta.ctx_lens)
            return out.to(q.dtype)
        pool = self.kv[layer]
        B, Q, Hkv2 = meta.num_seqs, meta.max_query_len, pool.shape[1]
        # Gather each sequence's context from the pool in its own dtype: [B, L, 2 Hkv, D].
        ctx = pool.index_select(0, meta.ctx_slots.view(-1)).view(B, -1, Hkv2, D)
        if self.scales is not None:
            work = q.dtype if q.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
            scale = self.scales[layer].index_select(0, meta.ctx_slots.view(-1)).view(B, -1, Hkv2, 1)
            ctx = (ctx.to(work) * scale.to(work))
        ctx = ctx.transpose(1, 2)
        keys, values = ctx[:, : Hkv2 // 2], ctx[:, Hkv2 // 2 :]
        q = q.to(ctx.dtype)
        if meta.q_dest is None:  # every sequence brings exactly one query token
            qp = q.reshape(B, 1, H, D)
        else:
            qp = q.new_zeros(B * Q, H, D)
            qp[meta.q_dest] = q
            qp = qp.view(B, Q, H, D)
        out = F.scaled_dot_product_attention(
            qp.transpose(1, 2), keys, values, attn_mask=meta.mask, enable_gqa=Hkv2 // 2 != H
        )  # [B, H, Q, D]
        out = out.transpose(1, 2).reshape(B * Q, H * D)
        if meta.q_dest is not None:
            out = out[meta.q_dest]
        return out


def build_metadata(
    chunks: list[tuple[list[int], int, int]], block_size: int, device: torch.device | str = "cpu"
) -> AttentionMetadata:
    """Metadata for a step: one (block_table, num_computed_tokens, num_new_tokens) per sequence.

    Token i of a sequence lives in slot block_table[i // block_size] * block_size + i % block_size;
    new token j (position num_computed + j) attends to positions 0..num_computed + j.
    """
    # numpy, not torch: a decode step's metadata is a dozen small ops, each several times cheaper here.
    B = len(chunks)
    done = np.array([c[1] for c in chunks], dtype=np.int64)  # [B]
    q_lens = np.array([c[2] for c in chunks], dtype=np.int64)  # [B]
    ctx_lens = done + q_lens
    Q = int(q_lens.max())
    ctx_slots, valid, cols = _context_slots([c[0] for c in chunks], ctx_lens, block_size)
    # The new tokens' slots, in the flat (sequence-major) order of the step's tokens.
    slot_mapping = ctx_slots[valid & (cols[None, :] >= done[:, None])]  # [T]
    if Q == 1:
        mask = valid[:, None, None, :]  # [B, 1, 1, L]: one query per sequence sees its whole context
        q_dest = None
    else:
        rows = np.arange(Q)
        # Query row r of sequence b sits at position done + r and sees columns <= that. Padding rows
        # (r >= q_len) see a non-empty prefix too, so they never produce NaN; their output is dropped.
        qpos = done[:, None] + rows[None, :]  # [B, Q]
        mask = (cols[None, None, :] <= qpos[:, :, None])[:, None]  # [B, 1, Q, L]
        q_dest = (np.arange(B)[:, None] * Q + rows[None, :])[rows[None, :] < q_lens[:, None]]  # [T]

    def put(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    return AttentionMetadata(
        slot_mapping=put(slot_mapping),
        ctx_slots=put(ctx_slots),
        mask=put(mask),
        q_dest=None if q_dest is None else put(q_dest),
        num_seqs=B,
        max_query_len=Q,
        ctx_lens=put(ctx_lens),
        q_lens=put(q_lens),
    )


def _context_slots(tables: list[list[int]], ctx_lens: np.ndarray, block_size: int,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pool slot of every context column [B, L] (0 past a row's length), which columns are valid [B,
    L], and the columns [L]. The context is padded to a multiple of 32 columns (masked): the attention
    kernel's arithmetic for a row then depends on its own context only, not on the longest one in the
    batch (batch invariance)."""
    B = len(tables)
    L = -(-int(ctx_lens.max()) // CTX_ALIGN) * CTX_ALIGN
    width = max(len(t) for t in tables)
    if B == 1:
        table = np.array(tables[0], dtype=np.int64)[None, :]  # [1, W]
    else:
        table = np.zeros((B, width), dtype=np.int64)  # [B, W]
        for b, t in enumerate(tables):
            table[b, : len(t)] = t
    cols = np.arange(L)
    valid = cols[None, :] < ctx_lens[:, None]  # [B, L]
    blocks = table[:, np.minimum(cols // block_size, width - 1)]  # [B, L]
    return np.where(valid, blocks * block_size + cols % block_size, 0), valid, cols


def decode_metadata(tables: list[list[int]], done: list[int], block_size: int,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decode step's (slot_mapping [B], ctx_slots [B, L], ctx_lens [B]) for the fused path: each
    sequence brings one token at position done[b]. The same values as build_metadata's for those chunks,
    without the mask and query rows no fused step reads (0.12 ms a step of Python at one sequence)."""
    lens = np.array(done, dtype=np.int64) + 1  # [B]
    ctx_slots, _, _ = _context_slots(tables, lens, block_size)
    slot_mapping = ctx_slots[np.arange(len(tables)), lens - 1]
    return torch.from_numpy(slot_mapping), torch.from_numpy(ctx_slots), torch.from_numpy(lens)
