"""The one map from checkpoint tensor names to our parameters, and GGUF's Q/K row permutation."""

from __future__ import annotations

import re
from typing import cast

import torch

from llamaserve.config import ModelConfig

# GGUF (llama.cpp) name -> Hugging Face name; "{i}" is the layer index.
_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}

# Hugging Face name -> (our parameter, index of the piece inside a fused parameter or None).
_HF_TO_OURS = {
    "model.embed_tokens.weight": ("tok_embeddings.weight", None),
    "model.norm.weight": ("norm.weight", None),
    "lm_head.weight": ("output.weight", None),
    "model.layers.{i}.input_layernorm.weight": ("layers.{i}.attention_norm.weight", None),
    "model.layers.{i}.post_attention_layernorm.weight": ("layers.{i}.ffn_norm.weight", None),
    "model.layers.{i}.self_attn.q_proj.weight": ("layers.{i}.attention.wqkv.weight", 0),
    "model.layers.{i}.self_attn.k_proj.weight": ("layers.{i}.attention.wqkv.weight", 1),
    "model.layers.{i}.self_attn.v_proj.weight": ("layers.{i}.attention.wqkv.weight", 2),
    "model.layers.{i}.self_attn.o_proj.weight": ("layers.{i}.attention.wo.weight", None),
    "model.layers.{i}.mlp.gate_proj.weight": ("layers.{i}.feed_forward.w13.weight", 0),
    "model.layers.{i}.mlp.up_proj.weight": ("layers.{i}.feed_forward.w13.weight", 1),
    "model.layers.{i}.mlp.down_proj.weight": ("layers.{i}.feed_forward.w2.weight", None),
}

# Checkpoint tensors we know and do not need (RoPE tables are recomputed from the config).
IGNORED = re.compile(r"(rotary_emb\.inv_freq|rope_freqs\.weight)$")


def _compile(table: dict[str, object]) -> list[tuple[re.Pattern[str], object]]:
    return [(re.compile("^" + re.escape(k).replace(r"\{i\}", r"(\d+)") + "$"), v) for k, v in table.items()]


_GGUF_PATTERNS = _compile(_GGUF_TO_HF)  # type: ignore[arg-type]
_HF_PATTERNS = _compile(_HF_TO_OURS)  # type: ignore[arg-type]


def _lookup(name: str, patterns: list[tuple[re.Pattern[str], object]]) -> tuple[object, str] | None:
    for pattern, target in patterns:
        m = pattern.match(name)
        if m:
            return target, (m.group(1) if m.groups() else "")
    return None


def gguf_to_hf(name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None for a tensor we do not know."""
    found = _lookup(name, _GGUF_PATTERNS)
    if found is None:
        return None
    target, layer = found
    return str(target).replace("{i}", layer)


def hf_to_ours(name: str) -> tuple[str, int | None] | None:
    """(our parameter name, fused piece index) for a Hugging Face tensor name, or None if unknown."""
    found = _lookup(name, _HF_PATTERNS)
    if found is None:
        return None
    target, layer = found
    param, piece = cast(tuple[str, int | None], target)
    return param.replace("{i}", layer), piece


def fused_rows(cfg: ModelConfig, param: str, piece: int) -> tuple[int, int]:
    """Row range [start, end) of a piece inside a fused parameter (wqkv: q, k, v; w13: gate, up)."""
    if param.endswith("wqkv.weight"):
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        starts: tuple[int, ...] = (0, q, q + kv, q + 2 * kv)
    else:
        i = cfg.intermediate_size
        starts = (0, i, 2 * i)
    return starts[piece], starts[piece + 1]


def unpermute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo the row permutation GGUF conversion applies to Q and K (interleaved -> half-split RoPE)."""
    rows = weight.shape[0]
    w = weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
    return w.transpose(1, 2).reshape(weight.shape)
