"""The Llama transformer (gpt-fast style): RMSNorm, RoPE, GQA attention over a paged KV cache, SwiGLU."""

from __future__ import annotations

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
    """x: [T, H, D]; cos, sin: [T, 1, D]. Rotate-half convention (HF layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.wqkv = nn.Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=False)  # fused q, k, v
        self.wo = nn.Linear(q_size, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor,  # [T, 1, D]
        sin: torch.Tensor,
        meta: AttentionMetadata,
        cache: PagedKVCache,
    ) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.wqkv(x).split(self.split, dim=-1)
        q = apply_rope(q.view(T, self.n_heads, self.head_dim), cos, sin)  # [T, Hq, D]
        k = apply_rope(k.view(T, self.n_kv, self.head_dim), cos, sin)  # [T, Hkv, D]
        v = v.view(T, self.n_kv, self.head_dim)
        k_pool, v_pool = cache.k[self.layer], cache.v[self.layer]
        k_pool.index_copy_(0, meta.slot_mapping, k.to(k_pool.dtype))
        v_pool.index_copy_(0, meta.slot_mapping, v.to(v_pool.dtype))
        B, Q = meta.num_seqs, meta.max_query_len
        # Gather each sequence's context from the pool: [B, Hkv, L, D].
        keys = k_pool[meta.ctx_slots].transpose(1, 2).to(q.dtype)
        values = v_pool[meta.ctx_slots].transpose(1, 2).to(q.dtype)
        if meta.q_dest is None:  # every sequence brings exactly one query token
            qp = q.view(B, 1, self.n_heads, self.head_dim)
        else:
            qp = q.new_zeros(B * Q, self.n_heads, self.head_dim)
            qp[meta.q_dest] = q
            qp = qp.view(B, Q, self.n_heads, self.head_dim)
        out = F.scaled_dot_product_attention(
            qp.transpose(1, 2), keys, values, attn_mask=meta.mask, enable_gqa=self.n_kv != self.n_heads
        )  # [B, Hq, Q, D]
        out = out.transpose(1, 2).reshape(B * Q, self.n_heads * self.head_dim)
        if meta.q_dest is not None:
            out = out[meta.q_dest]
        return self.wo(out)


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
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.feed_forward = MLP(cfg)

    def forward(self, x, cos, sin, meta: AttentionMetadata, cache: PagedKVCache) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, meta, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer(
            "inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), persistent=False
        )

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        meta: AttentionMetadata,
        cache: PagedKVCache,
    ) -> torch.Tensor:
        """Run T new tokens of B sequences; return the final hidden states [T, hidden]."""
        x = self.tok_embeddings(input_ids)
        inv_freq = cast(torch.Tensor, self.inv_freq)  # a registered buffer
        freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, D/2], float32
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, D]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, meta, cache)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] in float32."""
        return self.output(hidden).float()
