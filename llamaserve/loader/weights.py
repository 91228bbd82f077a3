"""Build a Transformer from a GGUF file or HF folder, streaming tensor by tensor into its parameters."""

from __future__ import annotations

import ctypes
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from tqdm import tqdm

from llamaserve.config import ModelConfig
from llamaserve.loader import gguf as gguf_loader
from llamaserve.loader import safetensors as st_loader
from llamaserve.loader.errors import ModelLoadError
from llamaserve.loader.names import IGNORED, fused_rows, gguf_to_hf, hf_to_ours
from llamaserve.loader.registry import ModelNotFoundError, resolve_model
from llamaserve.model.llama import Transformer, rope_inv_freq
from llamaserve.model.native import FusedDecoder
from llamaserve.model.quant import INT4_TYPES, CastLinear, Int4Linear, Int8Linear, Q4Weight

log = logging.getLogger("llamaserve")


@dataclass(slots=True)
class ModelSource:
    """What a --model value points at, read without loading tensors."""

    path: Path
    kind: str  # "gguf" | "hf"
    config: ModelConfig
    metadata: dict = field(default_factory=dict)
    tensor_types: Counter = field(default_factory=Counter)
    reader: Any = None  # the open GGUFReader (parsing its header is slow: it is read once)


def inspect_model(model: str | None) -> ModelSource:
    """Resolve and read a model's config (no tensor data is touched)."""
    try:
        path = resolve_model(model)
    except ModelNotFoundError as e:
        raise ModelLoadError(str(e)) from e
    if path.is_dir():
        cfg = st_loader.read_config(path)
        types: Counter = Counter()
        from safetensors import safe_open

        for file in st_loader.weight_files(path):
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118
                    types[str(f.get_slice(name).get_dtype())] += 1
        return ModelSource(path, "hf", cfg, {}, types)
    cfg, meta, reader = gguf_loader.read_config(path)
    return ModelSource(path, "gguf", cfg, meta, Counter(t.tensor_type.name for t in reader.tensors), reader)


def resolve_dtype(dtype: str, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """'auto': float32 for small models on CPU (exact), bfloat16 for large ones and on CUDA."""
    if dtype == "auto":
        if device.type == "cuda" or cfg.num_parameters > 2_000_000_000:
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _tensors(source: ModelSource, keep_int4: frozenset[str]) -> Iterator[tuple[str, torch.Tensor | Q4Weight]]:
    if source.kind == "hf":
        return st_loader.iter_tensors(source.path)
    return gguf_loader.iter_tensors(source.reader, source.config, keep_int4)


def _int4_plan(source: ModelSource) -> tuple[set[str], frozenset[str]]:
    """Linear modules whose every source tensor is Q4_0/Q4_1, and those GGUF tensors' names."""
    if source.kind != "gguf":
        return set(), frozenset()
    by_module: dict[str, list] = {}
    for t in source.reader.tensors:
        hf = gguf_to_hf(t.name)
        target = hf_to_ours(hf) if hf else None
        if target is None or target[0] == "tok_embeddings.weight":
            continue
        by_module.setdefault(target[0].removesuffix(".weight"), []).append(t)
    modules = {m for m, ts in by_module.items() if all(t.tensor_type in INT4_TYPES for t in ts)}
    return modules, frozenset(t.name for m in modules for t in by_module[m])


def _swap_linears(net: Transformer, make: Callable[[nn.Linear], nn.Module],
                  only: set[str] | None = None) -> None:
    """Replace the linear modules named in `only` (default: every one) with make(old)."""
    linears = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    for name in linears if only is None else [n for n in linears if n in only]:
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, child,
                make(cast(nn.Linear, net.get_submodule(name))))


def _num_tensors(source: ModelSource) -> int:
    return sum(source.tensor_types.values())


def _copy_into(
    model: Transformer, params: dict, name: str, value: torch.Tensor | Q4Weight, seen: set
) -> None:
    if name == "rope_freqs.weight" and isinstance(value, torch.Tensor):  # Llama 3 factors from GGUF
        inv_freq: torch.Tensor = model.inv_freq  # type: ignore[assignment]
        inv_freq.div_(value.to(inv_freq))
        return
    target = hf_to_ours(name)
    if target is None:
        if IGNORED.search(name):
            return
        raise ModelLoadError(f"unexpected tensor {name!r} in a llama checkpoint")
    param_name, piece = target
    start, end = fused_rows(model.config, param_name, piece) if piece is not None else (0, None)
    module = model.get_submodule(param_name.removesuffix(".weight"))
    if isinstance(module, Int4Linear) and isinstance(value, Q4Weight):
        module.load_rows(start, value)
        seen.add((param_name, piece))
        return
    if isinstance(value, Q4Weight):
        value = value.dequantize()
    dest = params[param_name][start:end]
    if tuple(dest.shape) != tuple(value.shape):
        raise ModelLoadError(f"tensor {name} has shape {tuple(value.shape)}, expected {tuple(dest.shape)}")
    with torch.no_grad():
        dest.copy_(value)
    seen.add((param_name, piece))


def load_model(
    model: str | None, dtype: str = "auto", device: str = "cpu", progress: bool = False,
    quantization: str = "none",
) -> tuple[Transformer, ModelSource]:
    """Load weights one tensor at a time into parameters allocated once in their final dtype.

    Quantization (CPU only): "int4" keeps GGUF Q4_0/Q4_1 linear weights 4-bit in memory and its peak stays
    near the final size; any other linear weight stays dense, except the head, which becomes int8.
    "int8" quantizes every linear weight (any GGUF type, or safetensors) to int8 after the load, so its
    peak is the bfloat16 model. The quantized matmuls run our native kernels where they build (int8
    per block of 32, activations rounded to int8; model/native.py), else torch's (int8 per row,
    bfloat16 inputs). With dtype "auto" (or float32) activations, norms, attention and the KV cache are
    float32, and dense weights are stored in bfloat16.
    """
    source = inspect_model(model)
    cfg = source.config
    dev = torch.device(device)
    int4, quantized = quantization == "int4", quantization in ("int4", "int8")
    if quantized and dev.type != "cpu":
        raise ModelLoadError(f"{quantization} weights run on the CPU only; use --quantization none on CUDA")
    act_dtype = torch.float32 if quantized and dtype == "auto" else resolve_dtype(dtype, cfg, dev)
    store_dtype = torch.bfloat16 if quantized and act_dtype == torch.float32 else act_dtype
    kernel_dtype = torch.bfloat16 if act_dtype == torch.float32 else act_dtype
    int4_modules, keep_int4 = _int4_plan(source) if int4 else (set(), frozenset())
    with torch.device("meta"):
        net = Transformer(cfg).to(store_dtype)  # shapes and dtypes only: no memory yet
        if store_dtype != act_dtype:
            net.act_dtype = act_dtype
            for norm in [net.norm, *(n for b in net.layers for n in (b.attention_norm, b.ffn_norm))]:
                norm.to(act_dtype)
            _swap_linears(net, lambda lin: CastLinear(lin.in_features, lin.out_features, bias=False,
                                                      dtype=store_dtype))
    _swap_linears(net, lambda lin: Int4Linear(lin.in_features, lin.out_features, kernel_dtype),
                  int4_modules)
    # Allocate every parameter once, already in its final dtype (never a float32 copy of a 7B model).
    net = net.to_empty(device=dev)
    # to_empty left the RoPE table uninitialised: compute it again.
    net.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(dev)
    params = dict(net.named_parameters(remove_duplicate=False))
    seen: set = set()
    start = time.perf_counter()
    bar = tqdm(total=_num_tensors(source), desc=f"loading {source.path.name}", unit=" tensors",
               disable=not progress)
    for name, value in _tensors(source, keep_int4):
        _copy_into(net, params, name, value, seen)
        bar.update(1)
    bar.close()
    _check_complete(net, seen)
    unfinished = [n for n, m in net.named_modules() if isinstance(m, Int4Linear) and not m.loaded]
    if unfinished:
        raise ModelLoadError(f"int4 weights incomplete for {', '.join(unfinished[:3])}")
    source.reader = None  # close the memory map: its pages would otherwise stay in our RSS
    net.tie_weights()
    del params  # drop our references: a dense weight is freed as soon as its int8 copy replaces it
    # int8: every dense linear (any source type) becomes int8. int4: a head that is not Q4 does
    # (requantizing it to 4 bits cost too much accuracy); other non-Q4 matrices stay dense.
    only = None if quantization == "int8" else {"output"} if int4 else set()
    _swap_linears(net, lambda lin: Int8Linear(lin.weight.detach(), kernel_dtype), only)
    net.eval()
    net.fused_decode = FusedDecoder.for_model(net)  # None unless every layer runs on our kernels
    _return_freed_memory()
    if quantized:
        quant = [m for m in net.modules() if isinstance(m, Int4Linear | Int8Linear)]
        log.info("%s: %d of %d quantized linears on our native kernels, decode steps %s", quantization,
                 sum(m.native for m in quant), len(quant),
                 "fused in one C call" if net.fused_decode is not None else "layer by layer")
    net.load_seconds = time.perf_counter() - start  # type: ignore[assignment]
    return net, source


def _return_freed_memory() -> None:
    """Give the heap's free pages back to the OS: the load's staging buffers (a 7B int4 load frees
    0.6 GB that glibc would otherwise keep in RSS). A no-op where glibc is not the C library."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _check_complete(net: Transformer, seen: set) -> None:
    cfg = net.config
    expected: set[tuple[str, int | None]] = {("tok_embeddings.weight", None), ("norm.weight", None)}
    if not cfg.tie_word_embeddings:
        expected.add(("output.weight", None))
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        expected |= {(p + "attention_norm.weight", None), (p + "ffn_norm.weight", None),
                     (p + "attention.wo.weight", None), (p + "feed_forward.w2.weight", None)}
        expected |= {(p + "attention.wqkv.weight", k) for k in range(3)}
        expected |= {(p + "feed_forward.w13.weight", k) for k in range(2)}
    missing = sorted(f"{n}[{k}]" if k is not None else n for n, k in expected - seen)
    if missing:
        raise ModelLoadError(f"checkpoint lacks {len(missing)} tensors, e.g. {', '.join(missing[:3])}")
