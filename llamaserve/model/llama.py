"""The Llama transformer (gpt-fast style): RMSNorm, RoPE, GQA attention over a paged KV cache, SwiGLU."""

from __future__ import annotations

import itertools
import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from llamaserve.config import ModelConfig, RopeScaling
from llamaserve.model.kv_cache import AttentionMetadata, PagedKVCache


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2], with linear or Llama 3 scaling as transformers computes them."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        old_len = scaling.original_max_position_embeddings
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; cos, sin: [T, 1, D] with sin's first half negated. Rotate-half convention (HF layout):
    x * cos + cat(-x2, x1) * sin, written as x * cos + roll(x) * (-sin1, sin2) to save ops."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


ROPE_CHUNK = 256  # positions per computation of the cached RoPE table


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op, the same arithmetic as below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.wqkv = nn.Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=False)  # fused q, k, v
        self.wo = nn.Linear(q_size, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor,  # [T, 1, D]
        sin: torch.Tensor,
        meta: AttentionMetadata,
        cache: PagedKVCache,
        layer: int,
    ) -> torch.Tensor:
        T, H, Hkv, D = x.shape[0], self.n_heads, self.n_kv, self.head_dim
        qkv = self.wqkv(x)
        qk = apply_rope(qkv[:, : (H + Hkv) * D].view(T, H + Hkv, D), cos, sin)  # q and k heads at once
        kv_new = torch.cat((qk[:, H:], qkv[:, (H + Hkv) * D :].view(T, Hkv, D)), dim=1)  # [T, 2 Hkv, D]
        cache.write(layer, meta.slot_mapping, kv_new)
        return self.wo(cache.attend(layer, qk[:, :H], meta).to(x.dtype))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.inter = cfg.intermediate_size
        self.w13 = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)  # fused gate, up
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).split(self.inter, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.feed_forward = MLP(cfg)

    def forward(self, x, cos, sin, meta: AttentionMetadata, cache: PagedKVCache, layer: int) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, meta, cache, layer)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.act_dtype: torch.dtype | None = None  # activations' dtype when it differs from the weights'
        # The loader builds this on the meta device, where torch runs normal_ and arithmetic through its
        # Python reference code, which imports torch._dynamo and sympy: ~66 MB of RSS for the process's
        # life. So nothing here may run on meta but factories and nn.Linear's init (a test in
        # tests/loader/test_gguf.py checks): the embedding's normal_ draw (nn.Embedding's own, same
        # values) is skipped there, and the RoPE table is computed on the CPU (the loader computes it
        # again on the model's device).
        weight = torch.empty(cfg.vocab_size, cfg.hidden_size)
        if not weight.is_meta:
            nn.init.normal_(weight)
        self.tok_embeddings: nn.Module = nn.Embedding.from_pretrained(weight, freeze=False)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.output: nn.Module = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        with torch.device("cpu"):
            inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # The RoPE table: (inv_freq it came from, its version / dtype / device, cos, sin [positions, D]).
        self._rope_table: tuple[torch.Tensor, tuple, torch.Tensor, torch.Tensor] | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The activations' (and the KV cache's) dtype."""
        return self.act_dtype or self.norm.weight.dtype

    def tie_weights(self) -> None:
        """A tied dense head shares the embedding's parameter (a quantized one was loaded from its blocks)."""
        if self.config.tie_word_embeddings and isinstance(self.output, nn.Linear) \
                and isinstance(self.tok_embeddings, nn.Embedding):
            self.output.weight = self.tok_embeddings.weight

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Token embeddings [T, hidden] and the RoPE tables cos, sin [T, 1, D] for these positions."""
        x = self.tok_embeddings(input_ids).to(self.dtype)
        if torch.compiler.is_compiling():  # (a graph computes them; the cache below is Python state)
            cos, sin = self._rope(positions, x.dtype)
        else:
            cos, sin = self._rope_lookup(positions, x.dtype)
        return x, cos[:, None, :], sin[:, None, :]

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, D] at these positions, in `dtype`; sin's first half negated (see apply_rope)."""
        inv_freq = cast(torch.Tensor, self.inv_freq)  # a registered buffer
        freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, D/2], float32
        c, s = freqs.cos(), freqs.sin()
        return torch.cat((c, c), dim=-1).to(dtype), torch.cat((-s, s), dim=-1).to(dtype)

    def _rope_lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """_rope's rows from a table computed ROPE_CHUNK positions at a time and kept: a decode step then
        costs one gather instead of eight small ops. Every chunk is computed by the same ops on the same
        shape, so a position's values never depend on the order in which positions were first seen."""
        need = int(positions.max()) + 1 if positions.numel() else 0
        inv_freq = cast(torch.Tensor, self.inv_freq)
        # Rebuilt when the frequencies change (the loader sets them after construction) or move. The key
        # holds the tensor itself, compared by identity: an id() could be reused by a later tensor.
        key = (inv_freq._version, dtype, positions.device)
        if self._rope_table is None or self._rope_table[0] is not inv_freq or self._rope_table[1] != key:
            empty = torch.empty(0, self.config.head_dim, dtype=dtype, device=positions.device)
            self._rope_table = (inv_freq, key, empty, empty)
        _, _, cos, sin = self._rope_table
        if need > cos.shape[0]:  # grown by doubling (up to the model's context), so copies add up to O(n)
            upto = max(need, min(2 * cos.shape[0], self.config.max_position_embeddings))
            chunks = [self._rope(torch.arange(start, start + ROPE_CHUNK, device=positions.device), dtype)
                      for start in range(cos.shape[0], upto, ROPE_CHUNK)]
            cos = torch.cat([cos, *(c for c, _ in chunks)])
            sin = torch.cat([sin, *(s for _, s in chunks)])
            self._rope_table = (inv_freq, key, cos, sin)
        return cos[positions], sin[positions]

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        meta: AttentionMetadata,
        cache: PagedKVCache,
    ) -> torch.Tensor:
        """Run T new tokens of B sequences; return the final hidden states [T, hidden]."""
        x, cos, sin = self.embed(input_ids, positions)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, meta, cache, i)
        return self.norm(x)

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """One sequence [T] run without the KV cache (causal attention over itself, nothing kept): its
        final hidden states [T, hidden], for embeddings."""
        return self.hidden_states_many([input_ids])[0]

    def hidden_states_many(self, seqs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Several sequences in one forward: every linear runs on all their rows at once, attention on
        each sequence alone (causal over itself), so a sequence's result does not depend on the others."""
        lens = [int(t.shape[0]) for t in seqs]
        device = seqs[0].device
        positions = torch.cat([torch.arange(n, device=device) for n in lens])
        x, cos, sin = self.embed(torch.cat(seqs), positions)
        ends = list(itertools.accumulate(lens))
        bounds = list(zip([0] + ends[:-1], ends, strict=True))
        for layer in self.layers:
            block = cast(Block, layer)
            a = cast(Attention, block.attention)
            T, H, Hkv, D = x.shape[0], a.n_heads, a.n_kv, a.head_dim
            qkv = a.wqkv(block.attention_norm(x))
            qk = apply_rope(qkv[:, : (H + Hkv) * D].view(T, H + Hkv, D), cos, sin)
            v_all = qkv[:, (H + Hkv) * D :].view(T, Hkv, D)
            outs = []
            for s, e in bounds:
                q = qk[s:e, :H].transpose(0, 1)  # [H, n, D]
                k = qk[s:e, H:].transpose(0, 1).repeat_interleave(H // Hkv, dim=0)
                v = v_all[s:e].transpose(0, 1).repeat_interleave(H // Hkv, dim=0)
                outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1)
                            .reshape(e - s, H * D))
            h = x + a.wo(torch.cat(outs).to(x.dtype))
            x = h + block.feed_forward(block.ffn_norm(h))
        x = self.norm(x)
        return [x[s:e] for s, e in bounds]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] in float32."""
        return self.output(hidden).float()
