"""Drive our Transformer over a paged KV cache as the engine does: chunked prefill, then decode steps."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from llamaserve.model.kv_cache import PagedKVCache, build_metadata
from llamaserve.model.llama import Transformer
from llamaserve.model.native import FusedDecoder, NativeKV


@dataclass
class Seq:
    """One sequence: its token ids, its block table and how many tokens are in the cache."""

    ids: list[int]
    table: list[int]
    done: int = 0


def new_seqs(
    net: Transformer, prompts: list[list[int]], extra: int = 0, block_size: int = 16, seed: int = 0,
    kv_dtype: torch.dtype | None = None,
) -> tuple[PagedKVCache, list[Seq]]:
    """A cache big enough for every prompt plus `extra` tokens; block tables shuffled and interleaved.
    The K/V dtype is the model's unless given."""
    need = [-(-(len(p) + extra) // block_size) for p in prompts]
    blocks = list(range(sum(need) + 1))  # one spare block that nobody owns
    random.Random(seed).shuffle(blocks)
    seqs, start = [], 0
    for p, n in zip(prompts, need, strict=True):
        seqs.append(Seq(list(p), blocks[start : start + n]))
        start += n
    cfg = net.config
    cache = PagedKVCache(
        cfg.num_hidden_layers, len(blocks), block_size, cfg.num_key_value_heads, cfg.head_dim,
        kv_dtype or net.dtype,
    )
    return cache, seqs


def native_pools(cache: PagedKVCache) -> list[NativeKV]:
    """The cache's pools as our kernels see them, without switching the cache's own steps to them."""
    scales = cache.scales or [None] * len(cache.kv)
    return [NativeKV(p, s) for p, s in zip(cache.kv, scales, strict=True)]


def step(
    net: Transformer, cache: PagedKVCache, work: list[tuple[Seq, int]], last_only: bool = False,
    fused: FusedDecoder | None = None,
) -> list[torch.Tensor]:
    """Run n new tokens of each (seq, n) in one batch; return each one's logits [n or 1, vocab].
    With `fused`, a decode step (one token per sequence) runs as the model runner runs it, in one call
    (over the same pools; the cache's other steps keep the path they had)."""
    meta = build_metadata([(s.table, s.done, n) for s, n in work], cache.block_size)
    ids = torch.tensor([t for s, n in work for t in s.ids[s.done : s.done + n]])  # [T]
    positions = torch.cat([torch.arange(s.done, s.done + n) for s, n in work])  # [T]
    sizes = [n for _, n in work]
    with torch.no_grad():
        if fused is not None and meta.q_dest is None:
            x, cos, sin = net.embed(ids, positions)
            hidden = fused.run(x, cos, sin, meta.slot_mapping, meta.ctx_slots, meta.ctx_lens,
                               native_pools(cache))  # (the final norm included)
        else:
            hidden = net(ids, positions, meta, cache)  # [T, hidden]
        if last_only:
            hidden, sizes = hidden[torch.tensor(sizes).cumsum(0) - 1], [1] * len(work)
        logits = net.logits(hidden)  # [T or B, vocab]
    for s, n in work:
        s.done += n
    return list(logits.split(sizes))


def forward_logits(net: Transformer, ids: list[int]) -> torch.Tensor:
    """Logits [T, vocab] of one sequence, prefilled in one step into shuffled cache blocks."""
    cache, (seq,) = new_seqs(net, [ids])
    return step(net, cache, [(seq, len(ids))])[0]


def greedy(net: Transformer, prompts: list[list[int]], n: int, block_size: int = 16) -> list[list[int]]:
    """n greedy tokens for each prompt: one batched prefill, then n - 1 batched decode steps."""
    cache, seqs = new_seqs(net, prompts, extra=n, block_size=block_size)
    out: list[list[int]] = [[] for _ in prompts]
    logits = step(net, cache, [(s, len(s.ids)) for s in seqs], last_only=True)
    for i in range(n):
        for s, row, toks in zip(seqs, logits, out, strict=True):
            token = int(row[-1].argmax())
            toks.append(token)
            s.ids.append(token)
        if i < n - 1:
            logits = step(net, cache, [(s, 1) for s in seqs], last_only=True)
    return out
