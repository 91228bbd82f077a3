"""Hugging Face folders (config.json + safetensors) load to the same logits as transformers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from llamaserve.loader.weights import load_model
from tests.checkpoints import TINY, hf_logits, rel_err, tiny_hf_model
from tests.paged import forward_logits

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

VARIANTS: dict[str, dict[str, Any]] = {
    "mha": {"num_attention_heads": 4, "num_key_value_heads": 4},
    "gqa": {"num_attention_heads": 4, "num_key_value_heads": 2},
    "llama3_rope": {"rope_scaling": LLAMA3_SCALING},
    "linear_rope": {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    "tied": {"tie_word_embeddings": True},
    "untied": {"tie_word_embeddings": False},
    "sharded": {},
}

# 100 tokens: positions up to 99, past the llama3 variant's original 64-token context.
IDS = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(7)).tolist()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, Any]]:
    """Every variant written once: name -> (folder, the transformers model that wrote it)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, overrides in VARIANTS.items():
        model = tiny_hf_model(seed=len(name), **overrides)
        model.save_pretrained(root / name, max_shard_size="100KB" if name == "sharded" else "50GB")
        out[name] = (root / name, model)
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_float32_load_matches_transformers(checkpoints, name: str) -> None:
    folder, model = checkpoints[name]
    net, source = load_model(str(folder), dtype="float32")
    assert source.kind == "hf"
    assert net.tok_embeddings.weight.dtype == torch.float32
    assert source.config.num_key_value_heads == model.config.num_key_value_heads
    assert source.config.tie_word_embeddings == model.config.tie_word_embeddings
    assert source.config.rope_theta == TINY["rope_theta"]
    scaling = VARIANTS[name].get("rope_scaling", {"rope_type": "default"})
    assert source.config.rope_scaling.rope_type == scaling["rope_type"]
    err = rel_err(forward_logits(net, IDS), hf_logits(model, IDS))
    print(f"{name}: float32 max relative logit error {err:.2e}")
    assert err <= 1e-4


@pytest.mark.parametrize("name", list(VARIANTS))
def test_bfloat16_load_is_close(checkpoints, name: str) -> None:
    folder, model = checkpoints[name]
    net, _ = load_model(str(folder), dtype="bfloat16")
    assert net.tok_embeddings.weight.dtype == torch.bfloat16
    ours, ref = forward_logits(net, IDS), hf_logits(model, IDS)
    err = rel_err(ours, ref)
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"{name}: bfloat16 max relative logit error {err:.2e}, argmax agreement {agree:.0%}")
    # transformers' own bfloat16 run of these models errs by 5e-2 to 1.8e-1; a wrong weight gives ~1.
    assert err <= 0.1
    assert agree >= 0.9


def test_sharded_variant_spans_several_files(checkpoints) -> None:
    folder, _ = checkpoints["sharded"]
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) >= 3
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}


def test_tied_variant_stores_no_lm_head(checkpoints) -> None:
    from safetensors import safe_open

    folder, _ = checkpoints["tied"]
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    net, _ = load_model(str(folder), dtype="float32")
    assert net.output.weight is net.tok_embeddings.weight


@pytest.mark.parametrize("name", ["llama3_rope", "linear_rope"])
def test_rope_scaling_changes_the_logits(name: str) -> None:
    """The scaled variants differ from unscaled RoPE on the same weights: the parity above is not vacuous."""
    scaled = tiny_hf_model(seed=len(name), **VARIANTS[name])
    plain = tiny_hf_model(seed=len(name))
    assert rel_err(hf_logits(plain, IDS), hf_logits(scaled, IDS)) > 1e-2


@pytest.mark.parametrize("name", ["gqa", "tied"])
def test_int8_quantization_works_on_safetensors_checkpoints(checkpoints, name: str) -> None:
    """--quantization int8 needs no GGUF: every linear of an HF checkpoint becomes int8 per row."""
    from llamaserve.model.quant import Int8Linear

    path, hf = checkpoints[name]
    net, _ = load_model(str(path), quantization="int8")
    linears = [m for m in net.modules() if isinstance(m, Int8Linear)]
    assert len(linears) == 4 * hf.config.num_hidden_layers + 1  # wqkv, wo, w13, w2 per layer + head
    assert not any(isinstance(m, torch.nn.Linear) for m in net.modules())
    assert net.dtype == torch.float32
    ours, ref = forward_logits(net, IDS), hf_logits(hf, IDS)
    err = rel_err(ours, ref)
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"{name}: int8 max relative logit error {err:.2e}, argmax agreement {agree:.0%}")
    assert err <= 0.1  # bfloat16 matmul inputs: the bfloat16 test's bound
    assert agree >= 0.8  # random tiny models have near-ties; a wrong weight gives ~1/vocab
