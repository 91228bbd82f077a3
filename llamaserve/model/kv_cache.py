"""The paged KV-cache pool and the per-step attention metadata that indexes it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """Where this step's tokens go in the pool and which cached slots each sequence attends to.

    T = tokens in the step, B = sequences, Q = longest query chunk, L = longest context.
    """

    slot_mapping: torch.Tensor  # [T] long: pool slot for each new token's K/V
    ctx_slots: torch.Tensor  # [B, L] long: pool slots of each sequence's context (padding: slot 0)
    mask: torch.Tensor | None  # [B, 1, Q, L] bool, True = attend; None when every query is 1 token
    ctx_lens: torch.Tensor  # [B] long: context length per sequence (for the decode mask)
    q_dest: torch.Tensor | None  # [T] long: row of each token in the padded [B * Q] query; None if Q == 1
    num_seqs: int
    max_query_len: int


class PagedKVCache:
    """One preallocated pool per layer: K and V of shape [num_blocks * block_size, kv_heads, head_dim]."""

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
        shape = (num_blocks * block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

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
    slots: list[int] = []
    ctx: list[list[int]] = []
    q_lens = [n for _, _, n in chunks]
    for table, done, new in chunks:
        seq_slots = [table[i // block_size] * block_size + i % block_size for i in range(done + new)]
        slots.extend(seq_slots[done:])
        ctx.append(seq_slots)
    B, Q = len(chunks), max(q_lens)
    L = max(len(c) for c in ctx)
    ctx_slots = torch.tensor([c + [0] * (L - len(c)) for c in ctx], dtype=torch.long)
    ctx_lens = torch.tensor([len(c) for c in ctx], dtype=torch.long)
    cols = torch.arange(L)
    if Q == 1:
        # One query per sequence: it sees its whole context, nothing of the padding.
        mask = (cols[None, :] < ctx_lens[:, None])[:, None, None, :]  # [B, 1, 1, L]
        q_dest = None
    else:
        q_lens_t = torch.tensor(q_lens)
        rows = torch.arange(Q)
        # Query row r of sequence b sits at position (ctx_len - q_len + r) and sees columns <= that.
        qpos = (ctx_lens - q_lens_t)[:, None] + rows[None, :]  # [B, Q]
        # Padding rows (r >= q_len) see a non-empty prefix too, so they never produce NaN.
        mask = (cols[None, None, :] <= qpos[:, :, None])[:, None]  # [B, 1, Q, L]
        q_dest = torch.cat([b * Q + torch.arange(n) for b, n in enumerate(q_lens)])
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        ctx_slots=ctx_slots.to(device),
        mask=mask.to(device),
        ctx_lens=ctx_lens.to(device),
        q_dest=None if q_dest is None else q_dest.to(device),
        num_seqs=B,
        max_query_len=Q,
    )
