"""Build a Transformer from a GGUF file or HF folder, streaming tensor by tensor into its parameters."""

from __future__ import annotations

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
from llamaserve.model import native
from llamaserve.model.formats import FORMATS
from llamaserve.model.llama import Transformer, rope_inv_freq
from llamaserve.model.quant import (
    INT4_TYPES,
    CastLinear,
    GGUFLinear,
    Int4Linear,
    Int8Linear,
    QuantizedEmbedding,
    RawTensor,
    q4_from_blocks,
)
from llamaserve.sysmem import return_freed_memory

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


def _tensors(source: ModelSource, keep_raw: frozenset[str]) -> Iterator[tuple[str, torch.Tensor | RawTensor]]:
    if source.kind == "hf":
        return st_loader.iter_tensors(source.path)
    return gguf_loader.iter_tensors(source.reader, source.config, keep_raw)


@dataclass(slots=True)
class QuantPlan:
    """Which modules keep their GGUF blocks: linears (by module name), the embedding, and whether they
    run on our kernels (GGUFLinear) or torch's int4 kernels (Int4Linear, Q4_0/Q4_1 only)."""

    linears: set[str] = field(default_factory=set)
    embedding: bool = False
    native: bool = False
    tensors: frozenset[str] = frozenset()  # the GGUF tensors read as raw blocks


def _quant_plan(source: ModelSource, types: frozenset, embedding: bool, use_native: bool) -> QuantPlan:
    """Linear modules whose every source tensor has one of `types` (and a shape our kernels take)."""
    if source.kind != "gguf" or not types:
        return QuantPlan()
    cfg = source.config
    by_module: dict[str, list] = {}
    for t in source.reader.tensors:
        hf = gguf_to_hf(t.name)
        target = hf_to_ours(hf) if hf else None
        if target is not None:
            by_module.setdefault(target[0].removesuffix(".weight"), []).append(t)
    embed = by_module.pop("tok_embeddings", [])
    if cfg.tie_word_embeddings and embed:
        by_module["output"] = embed  # a tied head multiplies by the embedding's blocks

    def fits(ts: list) -> bool:
        return all(t.tensor_type in types
                   and (not use_native or native.supports(int(t.shape[1]), int(t.shape[0]))) for t in ts)

    linears = {m for m, ts in by_module.items() if fits(ts)}
    keep_embedding = embedding and bool(embed) and all(t.tensor_type in FORMATS for t in embed)
    names = {t.name for m in linears for t in by_module[m]}
    if keep_embedding:
        names |= {t.name for t in embed}
    return QuantPlan(linears, keep_embedding, use_native, frozenset(names))


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
    model: Transformer, params: dict, name: str, value: torch.Tensor | RawTensor, seen: set
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
    seen.add((param_name, piece))
    if isinstance(value, RawTensor):
        if param_name == "tok_embeddings.weight" and model.config.tie_word_embeddings:
            if _load_blocks(model.output, 0, value):  # a tied head multiplies by the same blocks
                seen.add(("output.weight", None))
        if _load_blocks(module, start, value):
            return
        value = value.dequantize()
    if param_name not in params:
        raise ModelLoadError(f"tensor {name} has no dense parameter to go into")
    dest = params[param_name][start:end]
    if tuple(dest.shape) != tuple(value.shape):
        raise ModelLoadError(f"tensor {name} has shape {tuple(value.shape)}, expected {tuple(dest.shape)}")
    with torch.no_grad():
        dest.copy_(value)


def _load_blocks(module: nn.Module, start: int, value: RawTensor) -> bool:
    """Give a module that keeps quantized blocks its rows; False for a dense module."""
    if isinstance(module, QuantizedEmbedding):
        module.load(value)
    elif isinstance(module, GGUFLinear):
        module.load_rows(start, value)
    elif isinstance(module, Int4Linear):
        module.load_rows(start, q4_from_blocks(value.data, value.qtype, value.rows, value.cols))
    else:
        return False
    return True


def _allocate(net: nn.Module, dev: torch.device) -> None:
    """net.to_empty(device=dev) by torch.empty: to_empty's empty_like on meta tensors runs torch's Python
    reference code, which imports sympy (~32 MB of RSS for the process's life). A tensor shared by
    several modules stays shared."""
    made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (meta tensor, held: no id reuse; new)

    def empty(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in made:
            new = torch.empty(t.shape, dtype=t.dtype, device=dev)
            made[id(t)] = (t, nn.Parameter(new, t.requires_grad) if isinstance(t, nn.Parameter) else new)
        return made[id(t)][1]

    for module in net.modules():
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for name, t in tensors:  # setattr keeps a buffer's persistence
            setattr(module, name, empty(t))


def resolve_quantization(quantization: str, source: ModelSource, dev: torch.device) -> str:
    """The mode a load runs in: "auto" becomes "dense" (bfloat16) for safetensors and on CUDA, and falls
    back to "int4" (torch's int4 kernels for Q4_0/Q4_1, the rest dense) where our kernels are unavailable."""
    if quantization in ("int4", "int8") and dev.type != "cpu":
        raise ModelLoadError(f"{quantization} weights run on the CPU only; use --quantization none on CUDA")
    if quantization != "auto":
        return quantization
    if source.kind != "gguf" or dev.type != "cpu":
        return "dense"
    if not native.available():
        log.warning("--quantization auto without our kernels (%s): Q4_0/Q4_1 weights on torch's int4 "
                    "kernels, every other weight dense in bfloat16", native.info())
        return "int4"
    return "auto"


def load_model(
    model: str | None, dtype: str = "auto", device: str = "cpu", progress: bool = False,
    quantization: str = "auto",
) -> tuple[Transformer, ModelSource]:
    """Load weights one tensor at a time into modules allocated once in their final form.

    Quantization (see resolve_quantization): "auto" (CPU, GGUF) keeps every quantized GGUF tensor in its
    own type (Q4_0 ... Q8_0, Q2_K ... Q6_K) on our kernels, the token embedding too (rows dequantized at
    lookup); F16/BF16/F32 weights run dense in bfloat16. "none" is the exact mode: every weight
    dequantized to float32 (bfloat16 above 2B parameters or on CUDA, unless --dtype says otherwise).
    "int4" keeps GGUF Q4_0/Q4_1 linears 4-bit and makes a head of another type int8; "int8" requantizes
    every linear (any GGUF type, or safetensors) to int8 per block of 32. With dtype "auto" the
    quantized modes run float32 activations, norms, attention and KV cache; dense weights are bfloat16.
    """
    source = inspect_model(model)
    cfg = source.config
    if source.kind == "gguf":  # wrong metadata must fail here, in one line, not as a huge allocation
        gguf_loader.check_tensor_types(source.reader)
        gguf_loader.check_against_tensors(cfg, source.reader)
    dev = torch.device(device)
    mode = resolve_quantization(quantization, source, dev)
    quantized = mode in ("auto", "int4", "int8")
    if mode == "dense" and dtype == "auto":
        act_dtype = torch.bfloat16
    else:
        act_dtype = torch.float32 if quantized and dtype == "auto" else resolve_dtype(dtype, cfg, dev)
    store_dtype = torch.bfloat16 if quantized and act_dtype == torch.float32 else act_dtype
    kernel_dtype = torch.bfloat16 if act_dtype == torch.float32 else act_dtype
    plan = QuantPlan()
    if mode == "auto":
        plan = _quant_plan(source, frozenset(FORMATS), True, True)
    elif mode == "int4":
        plan = _quant_plan(source, INT4_TYPES, False, native.available())
    with torch.device("meta"):
        net = Transformer(cfg).to(store_dtype)  # shapes and dtypes only: no memory yet
        if store_dtype != act_dtype:
            net.act_dtype = act_dtype
            for norm in [net.norm, *(n for b in net.layers for n in (b.attention_norm, b.ffn_norm))]:
                norm.to(act_dtype)
            _swap_linears(net, lambda lin: CastLinear(lin.in_features, lin.out_features, bias=False,
                                                      dtype=store_dtype))
    if plan.embedding:
        net.tok_embeddings = QuantizedEmbedding(cfg.vocab_size, cfg.hidden_size)  # type: ignore[assignment]
    if plan.native:
        _swap_linears(net, lambda lin: GGUFLinear(lin.in_features, lin.out_features), plan.linears)
    else:
        _swap_linears(net, lambda lin: Int4Linear(lin.in_features, lin.out_features, kernel_dtype),
                      plan.linears)
    # Allocate every parameter once, already in its final dtype (never a float32 copy of a 7B model).
    _allocate(net, dev)
    # That left the RoPE table uninitialised: compute it again.
    net.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(dev)
    params = dict(net.named_parameters(remove_duplicate=False))
    seen: set = set()
    start = time.perf_counter()
    bar = tqdm(total=_num_tensors(source), desc=f"loading {source.path.name}", unit=" tensors",
               disable=not progress)
    for name, value in _tensors(source, plan.tensors):
        _copy_into(net, params, name, value, seen)
        if isinstance(value, RawTensor):  # packing freed its temporaries: give them back before the next
            del value
            return_freed_memory()  # (glibc keeps freed heap pages: a 7B Q4_K_M load peaked at 8.8 GB)
        bar.update(1)
    bar.close()
    _check_complete(net, seen)
    unfinished = [n for n, m in net.named_modules()
                  if isinstance(m, GGUFLinear | Int4Linear) and not m.loaded]
    if unfinished:
        raise ModelLoadError(f"quantized weights incomplete for {', '.join(unfinished[:3])}")
    source.reader = None  # close its memory map (the token embedding keeps a map of its own bytes)
    net.tie_weights()
    del params  # drop our references: a dense weight is freed as soon as its int8 copy replaces it
    # int8: every dense linear (any source type) becomes int8. int4: a head that is not Q4 does
    # (requantizing it to 4 bits cost too much accuracy); other non-Q4 matrices stay dense.
    only = None if mode == "int8" else {"output"} if mode == "int4" else set()
    _swap_linears(net, lambda lin: Int8Linear(lin.weight.detach(), kernel_dtype), only)
    net.eval()
    return_freed_memory()
    if quantized:
        log.info("quantization %s: %s; kernels: %s", mode, _describe(net), native.info())
    net.load_seconds = time.perf_counter() - start  # type: ignore[assignment]
    return net, source


def _describe(net: Transformer) -> str:
    """How the linears run, e.g. 'Q4_K x 160, Q6_K x 65 on our kernels, 0 dense'."""
    kinds: Counter = Counter()
    for m in net.modules():
        weight = getattr(m, "native_weight", None)
        if weight is not None:
            kinds.update(weight.types())
        elif isinstance(m, Int4Linear | Int8Linear):
            kinds[f"torch {type(m).__name__}"] += 1
        elif isinstance(m, nn.Linear):
            kinds["dense"] += 1
    return ", ".join(f"{k} x {n}" for k, n in sorted(kinds.items()))


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
