"""Shared fixtures: the embedded SmolLM2 model and its tokenizer (loaded once per session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    from llamaserve.loader.registry import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def hf_tokenizer(smollm_path: Path):
    """transformers' own tokenizer for the embedded GGUF (the reference for ours)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name)


def pytest_configure(config):  # noqa: D103
    import torch

    # One torch thread for the whole run: on a busy 2-core machine two OpenMP threads wait a scheduler
    # slice for each other at every small matmul (2-6x slower), and the tests' servers need a core too.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):  # noqa: D103
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm_parts(smollm_path: Path):
    """(model, tokenizer) of the embedded model, loaded once; build engines around them cheaply."""
    from llamaserve.loader.tokenizer import load_tokenizer
    from llamaserve.loader.weights import load_model

    model, source = load_model(None, quantization="none")  # the exact mode: float32
    return model, load_tokenizer(source.path, None, source.metadata)
