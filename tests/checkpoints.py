"""Tiny random Llama checkpoints written by tests: Hugging Face folders and GGUF files (llama.cpp layout)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

# Small enough to build in milliseconds; every dimension a multiple of 32 (the Q*_0 block size).
TINY: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 50000.0,  # not the default, so a config reader that drops it is caught
    "initializer_range": 0.2,  # large enough that attention is sharp and positions matter
}

# Hugging Face name -> llama.cpp name; "{i}" is the layer index.
HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}


def tiny_hf_model(seed: int = 0, **overrides: Any) -> Any:
    """A random LlamaForCausalLM in float32, with non-trivial RMSNorm weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # init leaves them at 1: a dropped norm would go unseen
                p.uniform_(0.5, 1.5)
    return model


def hf_logits(model: Any, ids: list[int]) -> torch.Tensor:
    """transformers' logits [T, vocab] for one sequence."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|."""
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's row permutation of Q and K (half-split -> interleaved RoPE)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str:
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"]:
        layer = parts[2]
        key = ".".join(parts[:2] + ["{i}"] + parts[3:])
        return HF_TO_GGUF[key].replace("{i}", layer)
    return HF_TO_GGUF[hf_name]


def gguf_tensors(model: Any, qtype: QT) -> dict[str, tuple[np.ndarray, QT]]:
    """A model's weights as llama.cpp writes them: renamed, Q/K permuted, matrices in qtype, norms F32."""
    cfg = model.config
    out: dict[str, tuple[np.ndarray, QT]] = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = p.detach().float().numpy()
        if name.endswith("q_proj.weight"):
            w = permute_qk(w, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = permute_qk(w, cfg.num_key_value_heads)
        kind = qtype if w.ndim == 2 else QT.F32
        out[gguf_name(name)] = (quantize(w, kind), kind)
    return out


def dequantized_copy(model: Any, qtype: QT) -> Any:
    """The model with every matrix replaced by dequantize(quantize(W)): what a qtype GGUF file holds.

    Blocks run along rows, so quantizing before or after the Q/K row permutation gives the same values.
    """
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for _, p in ref.named_parameters():
            if p.ndim == 2:
                w = p.numpy()
                p.copy_(torch.from_numpy(dequantize(quantize(w, qtype), qtype).reshape(w.shape)))
    return ref


def rope_theta(hf_config: Any) -> float:
    """RoPE base of a LlamaConfig (transformers 5 keeps it in rope_parameters, 4.x as an attribute)."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def write_gguf(
    path: Path,
    hf_config: Any,
    tensors: dict[str, tuple[np.ndarray, QT]],
    arch: str = "llama",
    vocab_size_key: bool = True,
    tokens: list[str] | None = None,
    rope_scaling_factor: float | None = None,
    eos_token_id: int | None = None,
    scores: bool = True,
) -> Path:
    """A GGUF file with the `{arch}.*` metadata llama.cpp writes for a llama model, and the tensors."""
    c = hf_config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(rope_theta(c))
    if vocab_size_key:
        w.add_vocab_size(c.vocab_size)
    if rope_scaling_factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope_scaling_factor)
    if tokens is not None:
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        if scores:
            w.add_token_scores([0.0] * len(tokens))
    if eos_token_id is not None:
        w.add_eos_token_id(eos_token_id)
    for name, (data, kind) in tensors.items():
        if data.dtype == np.uint8:  # quantized blocks (or BF16 bytes)
            w.add_tensor(name, data, raw_dtype=kind)
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


K_QUANTS = [QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K]
# Byte offsets of the float16 scale fields inside each 256-value block (ggml-common.h).
K_SCALE_OFFSETS = {QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,)}


def finish_with_placeholders(w: gguf.GGUFWriter) -> None:
    """Give a metadata-only GGUF one-number placeholder tensors and write it (config tests read no data)."""
    for name in ("token_embd.weight", "output_norm.weight", "output.weight"):
        w.add_tensor(name, np.zeros(1, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def random_k_blocks(rng: np.random.Generator, rows: int, cols: int, qtype: QT) -> np.ndarray:
    """Random bytes of a K-quant tensor [rows, cols // 256 * block bytes], with small finite scales."""
    blocks = rng.integers(0, 256, size=(rows * cols // 256, gguf.GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
    for off in K_SCALE_OFFSETS[qtype]:
        scale = rng.uniform(-2e-3, 2e-3, size=blocks.shape[0]).astype(np.float16)
        blocks[:, off : off + 2] = scale.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)
