"""The paged KV-cache pool and the per-step attention metadata that indexes it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

CTX_ALIGN = 32


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


class PagedKVCache:
    """One preallocated pool per layer, [num_blocks * block_size, 2 * kv_heads, head_dim]: a slot holds a
    token's keys (heads 0..kv_heads-1) then its values, so one write and one gather serve both."""

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
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_blocks * block_size, 2 * num_kv_heads, head_dim)
        # Uninitialised: the OS commits a pool's pages as blocks are first written, so RSS grows with the
        # tokens held, not with --kv-cache-memory. Every slot is written before it is read, except slot 0,
        # which pads each sequence's context row (masked, but 0 x NaN is NaN): it is zeroed.
        self.kv = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        for pool in self.kv:
            pool[0].zero_()

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize


def build_metadata(
    chunks: list[tuple[list[int], int, int]], block_size: int, device: torch.device | str = "cpu"
) -> AttentionMetadata:
    """Metadata for a step: one (block_table, num_computed_tokens, num_new_tokens) per sequence.

    Token i of a sequence lives in slot block_table[i // block_size] * block_size + i % block_size;
    new token j (position num_computed + j) attends to positions 0..num_computed + j.
    """
    B = len(chunks)
    done = torch.tensor([c[1] for c in chunks], dtype=torch.long)  # [B]
    q_lens = torch.tensor([c[2] for c in chunks], dtype=torch.long)  # [B]
    ctx_lens = done + q_lens
    Q = int(q_lens.max())
    # Pad the context to a multiple of 32 columns (masked): the attention kernel's arithmetic for a row then
    # depends on its own context only, not on the longest one in the batch (batch invariance).
    L = -(-int(ctx_lens.max()) // CTX_ALIGN) * CTX_ALIGN
    width = max(len(c[0]) for c in chunks)
    tables = torch.tensor([c[0] + [0] * (width - len(c[0])) for c in chunks], dtype=torch.long)  # [B, W]
    cols = torch.arange(L)
    valid = cols[None, :] < ctx_lens[:, None]  # [B, L]
    blocks = torch.gather(tables, 1, (cols // block_size).clamp(max=width - 1).expand(B, L))
    ctx_slots = torch.where(valid, blocks * block_size + cols % block_size, 0)  # [B, L]
    # The new tokens' slots, in the flat (sequence-major) order of the step's tokens.
    slot_mapping = ctx_slots[valid & (cols[None, :] >= done[:, None])]  # [T]
    if Q == 1:
        mask = valid[:, None, None, :]  # [B, 1, 1, L]: one query per sequence sees its whole context
        q_dest = None
    else:
        rows = torch.arange(Q)
        # Query row r of sequence b sits at position done + r and sees columns <= that. Padding rows
        # (r >= q_len) see a non-empty prefix too, so they never produce NaN; their output is dropped.
        qpos = done[:, None] + rows[None, :]  # [B, Q]
        mask = (cols[None, None, :] <= qpos[:, :, None])[:, None]  # [B, 1, Q, L]
        q_dest = (torch.arange(B)[:, None] * Q + rows[None, :])[rows[None, :] < q_lens[:, None]]  # [T]
    return AttentionMetadata(
        slot_mapping=slot_mapping.to(device),
        ctx_slots=ctx_slots.to(device),
        mask=mask.to(device),
        q_dest=None if q_dest is None else q_dest.to(device),
        num_seqs=B,
        max_query_len=Q,
        ctx_lens=ctx_lens.to(device),
    )
