"""Every way a model can fail to load is a ModelLoadError naming the problem; the CLI shows no traceback."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from llamaserve.loader.errors import ModelLoadError
from llamaserve.loader.weights import inspect_model, load_model
from tests.checkpoints import gguf_tensors, tiny_hf_model, write_gguf


@pytest.fixture(scope="module")
def model():
    return tiny_hf_model(seed=1)


@pytest.fixture(scope="module")
def valid_gguf(tmp_path_factory, model) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "ok.gguf", model.config, gguf_tensors(model, QT.F16))


def test_missing_path(tmp_path) -> None:
    missing = tmp_path / "nowhere" / "model.gguf"
    with pytest.raises(ModelLoadError, match="not found") as e:
        load_model(str(missing))
    assert str(missing) in str(e.value)


def test_a_text_file_is_not_gguf(tmp_path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("this is not a model\n")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        inspect_model(str(path))


def test_an_empty_file_is_not_gguf(tmp_path) -> None:
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_model(str(path))


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.001], ids=["half", "last-bytes", "header"])
def test_truncated_gguf(tmp_path, valid_gguf, keep: float) -> None:
    data = valid_gguf.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: max(8, int(len(data) * keep))])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_model(str(path))


def test_the_valid_file_loads(valid_gguf) -> None:
    """The file the truncation tests cut is itself fine."""
    net, _ = load_model(str(valid_gguf), dtype="float32", quantization="none")
    assert net.config.num_hidden_layers == 2


def test_architecture_other_than_llama(tmp_path, model) -> None:
    path = write_gguf(tmp_path / "gpt2.gguf", model.config, gguf_tensors(model, QT.F16), arch="gpt2")
    with pytest.raises(ModelLoadError, match="unsupported architecture 'gpt2'"):
        inspect_model(str(path))


@pytest.mark.parametrize("qtype", [QT.IQ4_NL, QT.TQ1_0], ids=lambda q: q.name)
def test_unsupported_tensor_type(tmp_path, model, qtype: QT) -> None:
    import gguf

    tensors = gguf_tensors(model, QT.F16)
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = tensors["blk.0.ffn_down.weight"][0].shape  # 64 x 128: 128 is not a multiple of 256
    cols = max(cols, block)
    data = np.random.default_rng(0).integers(0, 256, (rows, cols // block * nbytes), dtype=np.uint8)
    tensors["blk.0.ffn_down.weight"] = (data, qtype)
    path = write_gguf(tmp_path / f"{qtype.name}.gguf", model.config, tensors)
    with pytest.raises(ModelLoadError, match=f"blk.0.ffn_down.weight has type {qtype.name}"):
        load_model(str(path))


def test_missing_tensor(tmp_path, model) -> None:
    tensors = gguf_tensors(model, QT.F16)
    del tensors["blk.1.attn_k.weight"]
    path = write_gguf(tmp_path / "holes.gguf", model.config, tensors)
    with pytest.raises(ModelLoadError, match=r"tensor blk\.1\.attn_k\.weight, which the file lacks"):
        load_model(str(path))


def _mutant(tmp_path: Path, model: Any, name: str, **changes: Any) -> Path:
    config = copy.deepcopy(model.config)
    for key, value in changes.items():
        setattr(config, key, value)
    return write_gguf(tmp_path / f"{name}.gguf", config, gguf_tensors(model, QT.F16))


@pytest.mark.parametrize("changes,message", [
    ({"num_attention_heads": 0}, r"llama\.attention\.head_count must be >= 1, got 0"),
    ({"num_hidden_layers": 1000}, r"describes tensor blk\.2\.attn_q\.weight, which the file lacks "
                                  r"\(block_count 1000, tensors for 2 blocks\)"),
    ({"num_hidden_layers": 1}, r"holds tensors for 2 blocks, but its metadata says block_count 1"),
    ({"hidden_size": 2**31}, r"tensor token_embd\.weight has shape \[64, \d+\], but the GGUF metadata "
                             r"implies \[2147483648"),
    ({"intermediate_size": 4096}, r"blk\.0\.ffn_gate\.weight has shape \[64, 128\]"),
    ({"num_key_value_heads": 1}, r"blk\.0\.attn_k\.weight has shape"),
], ids=["head_count_0", "block_count_1000", "block_count_1", "embedding_2^31", "ffn_length", "kv_heads"])
def test_wrong_metadata_values_are_one_line_before_any_allocation(tmp_path, model, changes, message) -> None:
    import tracemalloc

    path = _mutant(tmp_path, model, "mutant", **changes)
    tracemalloc.start()
    with pytest.raises(ModelLoadError, match=message) as e:
        load_model(str(path))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert "\n" not in str(e.value) and peak < 50 * 2**20  # refused before the model was allocated


def test_a_special_token_id_outside_the_vocabulary(tmp_path, model) -> None:
    tokens = [f"t{i}" for i in range(model.config.vocab_size)]
    path = write_gguf(tmp_path / "eos.gguf", model.config, gguf_tensors(model, QT.F16), tokens=tokens,
                      eos_token_id=model.config.vocab_size + 5)
    with pytest.raises(ModelLoadError, match=r"tokenizer\.ggml\.eos_token_id is \d+, outside the vocabulary"):
        inspect_model(str(path))


def test_hf_folder_of_another_architecture(tmp_path, model) -> None:
    model.config.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(ModelLoadError, match="unsupported architecture 'mistral'"):
        load_model(str(tmp_path))


def test_folder_without_config(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        inspect_model(str(tmp_path))


def test_folder_without_weights(tmp_path, model) -> None:
    model.config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        load_model(str(tmp_path))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llamaserve.cli", *args], capture_output=True, text=True, timeout=120
    )


NO_CLI = importlib.util.find_spec("llamaserve.cli") is None


@pytest.mark.skipif(NO_CLI, reason="llamaserve.cli not written yet")
def test_cli_info_with_a_missing_model_prints_the_error_without_a_traceback(tmp_path) -> None:
    missing = tmp_path / "missing.gguf"
    result = run_cli("info", "--model", str(missing))
    assert result.returncode != 0
    assert result.stdout == ""
    assert f"model {str(missing)!r} not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_llama_vocabulary_without_scores_is_one_line_not_a_key_error(tmp_path, model) -> None:
    tokens = [f"t{i}" for i in range(model.config.vocab_size)]
    path = write_gguf(tmp_path / "noscores.gguf", model.config, gguf_tensors(model, QT.F16), tokens=tokens,
                      scores=False)
    with pytest.raises(ModelLoadError, match=r"a llama tokenizer needs tokenizer\.ggml\.scores"):
        load_model(str(path))


def _edited(tmp_path: Path, model: Any, key: str, value: Any, part: int | None = None) -> Path:
    """A valid file (with a vocabulary) with one metadata value, or an array's length, rewritten in place."""
    from gguf import GGUFReader

    tokens = [f"t{i}" for i in range(model.config.vocab_size)]
    path = write_gguf(tmp_path / "edited.gguf", model.config, gguf_tensors(model, QT.F16), tokens=tokens)
    field = GGUFReader(path, "r+").fields[key]
    field.parts[field.data[0] if part is None else part][0] = value
    return path


@pytest.mark.parametrize("key,value,part,message", [
    ("tokenizer.ggml.tokens", 10**9, 4, r"an array of 1000000000 strings at byte \d+ goes past the end"),
    ("tokenizer.ggml.scores", 2**40, 4, r"an array of 1099511627776 values at byte \d+ goes past the end"),
    ("llama.rope.dimension_count", 15, None, r"rope\.dimension_count is 15, but the head dimension is 16"),
    ("llama.attention.layer_norm_rms_epsilon", float("nan"), None,
     r"rms_epsilon must be in \(0, 1\), got nan"),
    ("llama.rope.freq_base", float("inf"), None, r"freq_base must be a finite number >= 1, got inf"),
], ids=["tokens_length", "scores_length", "rope_dim", "eps_nan", "theta_inf"])
def test_impossible_lengths_and_values_are_one_line_and_fast(tmp_path, model, key, value, part,
                                                             message) -> None:
    import time

    path = _edited(tmp_path, model, key, value, part)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match=message) as e:
        load_model(str(path))
    assert "\n" not in str(e.value) and time.perf_counter() - start < 5
