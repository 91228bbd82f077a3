"""GGUF files: config from `llama.*` metadata and tensors dequantized with gguf's reference code."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize

from llamaserve.config import ModelConfig, RopeScaling
from llamaserve.loader.errors import ModelLoadError
from llamaserve.loader.names import gguf_to_hf, unpermute_qk
from llamaserve.model.quant import RawTensor
from llamaserve.sysmem import drop_mapped_pages, file_map

SUPPORTED_TYPES = frozenset(
    {QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0,
     QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K}
)
GGUF_MAGIC = b"GGUF"


def open_gguf(path: Path) -> GGUFReader:
    """Open a GGUF file, turning every way it can be broken into a ModelLoadError."""
    if not path.is_file():
        raise ModelLoadError(f"{path} is not a file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    check_layout(path)
    try:
        return GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors...
        raise ModelLoadError(f"{path} is truncated or corrupt: {type(e).__name__}: {e}") from e


_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value types
_STRING, _ARRAY = 8, 9


def check_layout(path: Path) -> None:
    """Walk the header's key/value section and refuse any count or length larger than the bytes left.

    gguf's reader trusts them: an array length of 10^9 in an otherwise valid file keeps it parsing for
    minutes (or allocating) before it fails. This walk reads only lengths (~50 ms for a 49k-token
    vocabulary); GGUFReader then parses a file whose sizes are at least possible."""
    import mmap
    import struct

    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        size = len(m)
        if size < 24:
            raise ModelLoadError(f"{path} is truncated or corrupt: {size} bytes, shorter than a GGUF "
                                 "header")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", m, 4)
        if version not in (2, 3):
            return  # the reader names the version it does not read
        pos = 24

        def fail(what: str) -> ModelLoadError:
            return ModelLoadError(f"{path} is truncated or corrupt: {what} at byte {pos} goes past the end "
                                  f"of the file ({size} bytes)")

        def need(n: int, what: str) -> None:
            if n < 0 or pos + n > size:
                raise fail(what)

        def string(what: str) -> None:
            nonlocal pos
            need(8, what)
            (n,) = struct.unpack_from("<Q", m, pos)
            need(8 + n, what)
            pos += 8 + n

        if n_kv * 13 > size or n_tensors * 28 > size:  # a key/value or tensor entry's smallest size
            raise fail(f"a count of {n_kv} key/value pairs and {n_tensors} tensors")
        for _ in range(n_kv):
            string("a key")
            need(4, "a value type")
            (kind,) = struct.unpack_from("<I", m, pos)
            pos += 4
            if kind == _ARRAY:
                need(12, "an array header")
                item, count = struct.unpack_from("<IQ", m, pos)
                pos += 12
                if item == _STRING:
                    need(count * 8, f"an array of {count} strings")
                    for _ in range(count):
                        string("a string in an array")
                elif item in _SCALAR_SIZES:
                    need(count * _SCALAR_SIZES[item], f"an array of {count} values")
                    pos += count * _SCALAR_SIZES[item]
                else:
                    raise ModelLoadError(f"{path} is truncated or corrupt: unknown array item type {item} at "
                                         f"byte {pos}")
            elif kind == _STRING:
                string("a string value")
            elif kind in _SCALAR_SIZES:
                need(_SCALAR_SIZES[kind], "a value")
                pos += _SCALAR_SIZES[kind]
            else:
                raise ModelLoadError(f"{path} is truncated or corrupt: unknown value type {kind} at byte "
                                     f"{pos}")


def metadata(reader: GGUFReader) -> dict[str, Any]:
    """All key/value metadata except the (large) tokenizer arrays."""
    skip = {"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
            "tokenizer.ggml.merges"}
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key in skip or key.startswith("GGUF."):
            continue
        out[key] = field.contents()
    return out


def config_from_metadata(meta: dict[str, Any], tensor_names: set[str], vocab_len: int) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"unsupported architecture {arch!r}: llamaserve serves llama models only")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise ModelLoadError(f"GGUF metadata lacks llama.{key}")
        return value

    def get_float(key: str, default: float | None = None) -> float:
        # GGUF stores float32: take the shortest decimal that round-trips (1e-05, not 9.99999974e-06).
        return float(str(np.float32(get(key, default))))

    heads = _positive("attention.head_count", get("attention.head_count"))
    hidden = _positive("embedding_length", get("embedding_length"))
    scaling = RopeScaling()
    kind = meta.get("llama.rope.scaling.type")
    if kind == "linear":
        scaling = RopeScaling("linear", get_float("rope.scaling.factor"))
    elif kind not in (None, "none"):
        raise ModelLoadError(f"unsupported RoPE scaling type {kind!r} in GGUF metadata")
    head_dim = int(meta.get("llama.attention.key_length", hidden // heads))
    rope_dim = meta.get("llama.rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise ModelLoadError(f"GGUF metadata llama.rope.dimension_count is {rope_dim}, but the head "
                             f"dimension is {head_dim} (partial rotary embeddings are not supported)")
    eps, theta = get_float("attention.layer_norm_rms_epsilon", 1e-5), get_float("rope.freq_base", 10000.0)
    if not (0.0 < eps < 1.0):
        raise ModelLoadError(f"GGUF metadata llama.attention.layer_norm_rms_epsilon must be in (0, 1), "
                             f"got {eps}")
    if not (1.0 <= theta < float("inf")):
        raise ModelLoadError(f"GGUF metadata llama.rope.freq_base must be a finite number >= 1, got {theta}")
    try:
        return ModelConfig(
            vocab_size=int(meta.get("llama.vocab_size", vocab_len)),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_hidden_layers=int(get("block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(get("attention.head_count_kv", heads)),
            head_dim=head_dim,
            rms_norm_eps=eps,
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(get("context_length")),
            tie_word_embeddings="output.weight" not in tensor_names,
        )
    except ValueError as e:
        raise ModelLoadError(f"invalid model shape in GGUF metadata: {e}") from e


def _positive(key: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ModelLoadError(f"GGUF metadata llama.{key} is not an integer: {value!r}") from None
    if number < 1:
        raise ModelLoadError(f"GGUF metadata llama.{key} must be >= 1, got {number}")
    return number


def read_config(path: Path) -> tuple[ModelConfig, dict[str, Any], GGUFReader]:
    """Parse a GGUF file's config without touching its tensor data (check_against_tensors before a load)."""
    reader = open_gguf(path)
    meta = metadata(reader)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab_len = len(tokens.data) if tokens is not None else 0
    cfg = config_from_metadata(meta, {t.name for t in reader.tensors}, vocab_len)
    check_token_ids(meta, vocab_len)
    check_tokenizer_fields(meta, reader)
    return cfg, meta, reader


def check_tokenizer_fields(meta: dict[str, Any], reader: GGUFReader) -> None:
    """The arrays the file's tokenizer model needs are there, one entry per token (checked before loading)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind not in ("llama", "gpt2"):
        return  # the tokenizer loader names an unsupported or missing model
    names = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
             "tokenizer.ggml.merges")
    arrays = {k: len(reader.fields[k].data) for k in names if k in reader.fields}
    needed = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores" if kind == "llama" else
              "tokenizer.ggml.merges")
    for key in needed:
        if key not in arrays:
            raise ModelLoadError(f"GGUF metadata: a {kind} tokenizer needs {key}, which the file lacks")
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        if key in arrays and arrays[key] != arrays["tokenizer.ggml.tokens"]:
            raise ModelLoadError(f"GGUF metadata: {key} has {arrays[key]} entries for "
                                 f"{arrays['tokenizer.ggml.tokens']} tokens")


def check_against_tensors(cfg: ModelConfig, reader: GGUFReader) -> None:
    """The metadata must describe the tensors the file holds, before anything is allocated from it."""
    shapes = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    h, d = cfg.hidden_size, cfg.head_dim
    expected = {"token_embd.weight": [h, cfg.vocab_size], "output_norm.weight": [h]}
    if not cfg.tie_word_embeddings:
        expected["output.weight"] = [h, cfg.vocab_size]
    for i in range(cfg.num_hidden_layers):
        expected |= {f"blk.{i}.attn_q.weight": [h, cfg.num_attention_heads * d],
                     f"blk.{i}.attn_k.weight": [h, cfg.num_key_value_heads * d],
                     f"blk.{i}.attn_v.weight": [h, cfg.num_key_value_heads * d],
                     f"blk.{i}.attn_output.weight": [cfg.num_attention_heads * d, h],
                     f"blk.{i}.ffn_gate.weight": [h, cfg.intermediate_size],
                     f"blk.{i}.ffn_up.weight": [h, cfg.intermediate_size],
                     f"blk.{i}.ffn_down.weight": [cfg.intermediate_size, h]}
    for name, shape in expected.items():
        if name not in shapes:
            raise ModelLoadError(f"the GGUF metadata describes tensor {name}, which the file lacks "
                                 f"(block_count {cfg.num_hidden_layers}, tensors for "
                                 f"{_num_blocks(shapes)} blocks)")
        if shapes[name] != shape:
            raise ModelLoadError(f"tensor {name} has shape {shapes[name]}, but the GGUF metadata implies "
                                 f"{shape}")
    extra = _num_blocks(shapes)
    if extra > cfg.num_hidden_layers:
        raise ModelLoadError(f"the file holds tensors for {extra} blocks, but its metadata says block_count "
                             f"{cfg.num_hidden_layers}")


def _num_blocks(shapes: dict[str, list[int]]) -> int:
    ids = [int(n.split(".")[1]) for n in shapes if n.startswith("blk.") and n.split(".")[1].isdigit()]
    return max(ids) + 1 if ids else 0


def check_token_ids(meta: dict[str, Any], vocab_len: int) -> None:
    """Special token ids must name tokens of the vocabulary."""
    for key in ("bos_token_id", "eos_token_id", "eot_token_id", "eom_token_id", "padding_token_id",
                "unknown_token_id"):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None and not 0 <= int(value) < vocab_len:
            raise ModelLoadError(f"GGUF metadata tokenizer.ggml.{key} is {value}, outside the vocabulary "
                                 f"(0..{vocab_len - 1})")


def check_tensor_types(reader: GGUFReader) -> None:
    for t in reader.tensors:
        if t.tensor_type not in SUPPORTED_TYPES:
            raise ModelLoadError(
                f"tensor {t.name} has type {t.tensor_type.name}, which llamaserve does not support "
                f"(supported: {', '.join(sorted(q.name for q in SUPPORTED_TYPES))})"
            )


def dequantize_tensor(t: ReaderTensor) -> np.ndarray:
    """A tensor's values as float32, shaped [rows, cols] (GGUF lists dimensions innermost first)."""
    data = np.asarray(t.data)
    if t.tensor_type == QT.BF16 and data.dtype != np.uint8:
        data = data.view(np.uint8)
    shape = tuple(int(d) for d in reversed(t.shape))
    return dequantize(data, t.tensor_type).reshape(shape)


EMBEDDING = "token_embd.weight"


def iter_tensors(
    reader: GGUFReader, cfg: ModelConfig, keep_raw: frozenset[str] = frozenset()
) -> Iterator[tuple[str, torch.Tensor | RawTensor]]:
    """Yield (Hugging Face name, float32 tensor in HF layout) one tensor at a time.

    Tensors named in keep_raw (GGUF names of quantized tensors) come as their raw blocks instead: copied
    off the reader's map, except the token embedding, which stays a read-only map of the file (map_rows).
    """
    check_tensor_types(reader)
    for t in reader.tensors:
        name, value = _read_tensor(reader, t, cfg, keep_raw)
        yield name, value
        _drop_pages(reader, int(t.data_offset) + int(t.n_bytes))
        if t.name == EMBEDDING and isinstance(value, RawTensor):  # a tied head read every row to pack it
            drop_mapped_pages(file_map(value.data))


def _read_tensor(
    reader: GGUFReader, t: ReaderTensor, cfg: ModelConfig, keep_raw: frozenset[str]
) -> tuple[str, torch.Tensor | RawTensor]:
    """One tensor as iter_tensors yields it: (HF name, float32 tensor or raw blocks), Q and K unpermuted."""
    if t.name == "rope_freqs.weight":  # Llama 3 RoPE factors, kept under their own name
        return t.name, torch.from_numpy(dequantize_tensor(t).copy())
    name = gguf_to_hf(t.name)
    if name is None:
        raise ModelLoadError(f"unexpected tensor {t.name!r} in a llama GGUF file")
    try:
        value: torch.Tensor | RawTensor
        if t.name in keep_raw:
            rows, cols = (int(d) for d in reversed(t.shape))
            if t.name == EMBEDDING:  # looked up a few rows a step for the server's life: read in place
                data = map_rows(reader, t)
            else:  # packed into the kernels' layout once: copied, the reader's pages then dropped
                data = np.array(np.asarray(t.data).view(np.uint8).reshape(rows, -1), copy=True)
            value = RawTensor(t.tensor_type, data, cols)
        else:
            array = dequantize_tensor(t)
            if not (array.flags.writeable and array.flags.c_contiguous):  # a view of the memory map
                array = np.array(array, copy=True)
            value = torch.from_numpy(array)
    except ModelLoadError:
        raise
    except (ValueError, IndexError) as e:
        raise ModelLoadError(f"tensor {t.name} is truncated or corrupt: {e}") from e
    if name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = cfg.num_attention_heads if name.endswith("q_proj.weight") else cfg.num_key_value_heads
        if isinstance(value, RawTensor):  # whole rows of blocks move: the permutation is exact
            moved = unpermute_qk(torch.from_numpy(value.data), heads).contiguous()
            value = RawTensor(value.qtype, moved.numpy(), value.cols)
        else:
            value = unpermute_qk(value, heads)
    return name, value


def map_rows(reader: GGUFReader, t: ReaderTensor) -> np.ndarray:
    """A 2-D tensor's blocks as a read-only [rows, row bytes] view of its own map of just its bytes.

    Nothing is copied into our memory: rows are read from the page cache when used. Pages touched count
    as file-backed RSS until dropped (a fault maps a whole large page-cache folio: a hundred random rows
    of a 29 MB table mapped 17 MB), so a reader drops them after use (QuantizedEmbedding does). The map is
    its own, not a view of the reader's: it outlives the reader, which the loader closes after the load,
    and _drop_pages on the reader's map leaves it alone. It lives as long as the array or a view of it.
    The file must not be truncated or rewritten in place meanwhile (a read would raise SIGBUS); replacing
    it by a rename is safe (the old inode stays mapped).
    """
    filename = getattr(reader.data, "filename", None)
    if not isinstance(reader.data, np.memmap) or filename is None:
        raise ModelLoadError(f"tensor {t.name}: the GGUF reader's data is not a map of a file")
    rows, size = int(t.shape[-1]), int(t.n_bytes)
    if len(t.shape) != 2 or size % rows:
        raise ModelLoadError(f"tensor {t.name} of shape {list(t.shape)} and {size} bytes is not whole rows")
    table = np.memmap(filename, dtype=np.uint8, mode="r", offset=int(t.data_offset),
                      shape=(rows, size // rows))
    return np.asarray(table)  # a plain ndarray whose base is the np.memmap (which holds the mmap)


def _drop_pages(reader: GGUFReader, end: int) -> None:
    """Tell the kernel we are done with the memory map's pages up to `end` (the caller has copied them).

    Otherwise every page read stays in this process's RSS until the map closes: a 3.8 GB file would add
    3.8 GB to the peak. Everything before `end` is dropped each time, not just the last tensor: a fault
    on the next tensor may map a whole large page-cache folio that reaches back over earlier ones. The
    pages stay in the page cache; touching them again just maps them back.
    """
    drop_mapped_pages(file_map(reader.data), end)
