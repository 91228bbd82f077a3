"""Hugging Face model folders: config.json plus single or sharded *.safetensors files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from llamaserve.config import ModelConfig
from llamaserve.loader.errors import ModelLoadError


def read_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder} has no config.json: not a Hugging Face model folder")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from e
    arch = raw.get("model_type")
    if arch != "llama":
        raise ModelLoadError(f"unsupported architecture {arch!r}: llamaserve serves llama models only")
    try:
        return ModelConfig.from_hf(raw)
    except (KeyError, ValueError) as e:
        raise ModelLoadError(f"invalid {path}: {e}") from e


def weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder} holds no *.safetensors files")
    return files


def iter_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Hugging Face name, tensor) one at a time across all shards."""
    for file in weight_files(folder):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    yield name, f.get_tensor(name)
        except (OSError, RuntimeError, ValueError) as e:
            raise ModelLoadError(f"{file} is truncated or corrupt: {e}") from e
