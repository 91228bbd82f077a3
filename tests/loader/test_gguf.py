"""GGUF files in llama.cpp's layout load to transformers' logits; metadata parses to the right config."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from llamaserve.config import ModelConfig, RopeScaling
from llamaserve.loader.gguf import iter_tensors, map_rows, read_config
from llamaserve.loader.weights import inspect_model, load_model
from tests.checkpoints import (
    K_QUANTS,
    K_SCALE_OFFSETS,
    dequantized_copy,
    finish_with_placeholders,
    gguf_tensors,
    hf_logits,
    permute_qk,
    random_k_blocks,
    rel_err,
    tiny_hf_model,
    write_gguf,
)
from tests.paged import forward_logits

ROOT = Path(__file__).resolve().parents[2]
IDS = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(3)).tolist()


@pytest.fixture(scope="module")
def model():
    """GQA (4 query heads, 2 KV heads), so the K permutation must use the KV head count."""
    return tiny_hf_model(seed=11)


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.Q8_0, QT.Q4_0], ids=lambda q: q.name)
def test_logits_match_transformers_on_the_dequantized_weights(tmp_path, model, qtype: QT) -> None:
    path = write_gguf(tmp_path / f"tiny-{qtype.name}.gguf", model.config, gguf_tensors(model, qtype))
    net, source = load_model(str(path), dtype="float32", quantization="none")
    assert source.kind == "gguf"
    layers = model.config.num_hidden_layers
    expected = Counter({qtype.name: 7 * layers + 2}) + Counter({"F32": 2 * layers + 1})  # matrices, norms
    assert source.tensor_types == expected
    ref = dequantized_copy(model, qtype) if qtype != QT.F32 else model
    err = rel_err(forward_logits(net, IDS), hf_logits(ref, IDS))
    print(f"{qtype.name}: max relative logit error {err:.2e}")
    assert err <= 1e-4
    if qtype in (QT.Q8_0, QT.Q4_0):  # the quantized file really differs from the float model
        assert rel_err(hf_logits(ref, IDS), hf_logits(model, IDS)) > 1e-4


def test_config_from_metadata(tmp_path, model) -> None:
    c = model.config
    path = write_gguf(tmp_path / "tiny.gguf", c, gguf_tensors(model, QT.F32))
    cfg, meta, _ = read_config(path)
    assert meta["general.architecture"] == "llama"
    assert cfg == ModelConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
        rope_theta=50000.0, max_position_embeddings=512, tie_word_embeddings=False,
    )


def test_vocab_size_from_the_token_list_when_the_key_is_absent(tmp_path, model) -> None:
    """Older conversions (Llama 2 era) write no llama.vocab_size: the token list's length is the vocab."""
    tokens = [f"t{i}" for i in range(model.config.vocab_size)]
    path = write_gguf(tmp_path / "t.gguf", model.config, gguf_tensors(model, QT.F16),
                      vocab_size_key=False, tokens=tokens)
    cfg, meta, _ = read_config(path)
    assert "llama.vocab_size" not in meta
    assert cfg.vocab_size == 256


def test_tied_embeddings_when_the_file_has_no_output_tensor(tmp_path) -> None:
    tied = tiny_hf_model(seed=5, tie_word_embeddings=True)
    tensors = gguf_tensors(tied, QT.F16)
    assert "output.weight" not in tensors
    path = write_gguf(tmp_path / "tied.gguf", tied.config, tensors)
    net, source = load_model(str(path), dtype="float32", quantization="none")
    assert source.config.tie_word_embeddings
    assert net.output.weight is net.tok_embeddings.weight
    assert rel_err(forward_logits(net, IDS), hf_logits(dequantized_copy(tied, QT.F16), IDS)) <= 1e-4


def test_linear_rope_scaling_from_metadata(tmp_path) -> None:
    scaled = tiny_hf_model(seed=6, rope_scaling={"rope_type": "linear", "factor": 4.0})
    path = write_gguf(tmp_path / "linear.gguf", scaled.config, gguf_tensors(scaled, QT.F32),
                      rope_scaling_factor=4.0)
    net, source = load_model(str(path), dtype="float32", quantization="none")
    assert source.config.rope_scaling == RopeScaling("linear", 4.0)
    assert rel_err(forward_logits(net, IDS), hf_logits(scaled, IDS)) <= 1e-4


def llama3_rope_factors(head_dim: int, theta: float, scaling: dict) -> np.ndarray:
    """The rope_freqs.weight tensor convert_hf_to_gguf writes for Llama 3 RoPE scaling."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    old, factor = scaling["original_max_position_embeddings"], scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    out = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_llama3_rope_from_the_rope_freqs_tensor(tmp_path) -> None:
    """llama.cpp keeps Llama 3 scaling as a per-frequency divisor tensor, not as metadata."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    scaled = tiny_hf_model(seed=8, rope_scaling=scaling)
    tensors = gguf_tensors(scaled, QT.F32)
    factors = llama3_rope_factors(16, 50000.0, scaling)
    assert 1.0 < factors.max()  # some frequencies are scaled at this size
    tensors["rope_freqs.weight"] = (factors, QT.F32)
    path = write_gguf(tmp_path / "llama3.gguf", scaled.config, tensors)
    net, _ = load_model(str(path), dtype="float32", quantization="none")
    err = rel_err(forward_logits(net, IDS), hf_logits(scaled, IDS))  # positions up to 99 > 64
    print(f"llama3 rope_freqs: max relative logit error {err:.2e}")
    assert err <= 1e-4


def test_k_quant_weights_equal_gguf_dequantize(tmp_path) -> None:
    """K-quants (no numpy quantizer exists): random blocks, each matrix a different K type."""
    big = tiny_hf_model(seed=9, hidden_size=256, intermediate_size=512, head_dim=64)
    c = big.config
    rng = np.random.default_rng(0)
    tensors = gguf_tensors(big, QT.F32)
    raw: dict[str, tuple[np.ndarray, QT]] = {}
    for i, (name, (data, _)) in enumerate(sorted(tensors.items())):
        if data.ndim == 2:
            qtype = K_QUANTS[i % len(K_QUANTS)]
            raw[name] = (random_k_blocks(rng, *data.shape, qtype), qtype)
    tensors.update(raw)
    assert {q for _, q in raw.values()} == set(K_QUANTS)
    net, source = load_model(str(write_gguf(tmp_path / "k.gguf", c, tensors)), dtype="float32",
                             quantization="none")
    assert {k for k in source.tensor_types} == {"F32", *(q.name for q in K_QUANTS)}

    def ours(name: str) -> np.ndarray:
        """Our parameter for a GGUF tensor name, in the file's (permuted) row order."""
        if name == "token_embd.weight":
            return net.tok_embeddings.weight.detach().numpy()
        if name == "output.weight":
            return net.output.weight.detach().numpy()
        layer, kind = int(name.split(".")[1]), name.split(".")[2]
        block = net.layers[layer]
        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        inter = c.intermediate_size
        wqkv = block.attention.wqkv.weight.detach().numpy()
        w13 = block.feed_forward.w13.weight.detach().numpy()
        return {
            "attn_q": permute_qk(wqkv[:q], c.num_attention_heads),
            "attn_k": permute_qk(wqkv[q : q + kv], c.num_key_value_heads),
            "attn_v": wqkv[q + kv :],
            "attn_output": block.attention.wo.weight.detach().numpy(),
            "ffn_gate": w13[:inter],
            "ffn_up": w13[inter:],
            "ffn_down": block.feed_forward.w2.weight.detach().numpy(),
        }[kind]

    for name, (data, qtype) in raw.items():
        expected = dequantize(data, qtype)
        assert np.isfinite(expected).all()
        np.testing.assert_array_equal(ours(name), expected, err_msg=f"{name} ({qtype.name})")
    assert torch.isfinite(forward_logits(net, IDS[:20])).all()


LLAMA2_7B = ModelConfig(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, head_dim=128, rms_norm_eps=1e-5,
    rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False,
)


def test_llama2_7b_metadata_parses_without_tensors(tmp_path) -> None:
    """Llama 2 7B's real metadata with one-number placeholder tensors: the config alone is read."""
    import gguf

    path = tmp_path / "llama-2-7b.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("LLaMA v2")
    w.add_context_length(4096)
    w.add_embedding_length(4096)
    w.add_block_count(32)
    w.add_feed_forward_length(11008)
    w.add_rope_dimension_count(128)
    w.add_head_count(32)
    w.add_head_count_kv(32)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(32000)
    finish_with_placeholders(w)
    assert path.stat().st_size < 10_000
    source = inspect_model(str(path))
    assert source.kind == "gguf"
    assert source.config == LLAMA2_7B
    assert source.config.num_parameters == 6_738_415_616


def mapping_rss_kb(address: int) -> int | None:
    """Resident kB of the mapping of this process that contains `address` (Linux /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split()[0]
            if "-" in first and all(c in "0123456789abcdef-" for c in first):  # a mapping's header line
                lo, hi = (int(x, 16) for x in first.split("-"))
                inside = lo <= address < hi
            elif inside and line.startswith("Rss:"):
                return int(line.split()[1])
    return None


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("release", [True, False])
def test_reading_every_tensor_leaves_the_file_pages_out_of_our_rss(smollm_path, monkeypatch, release) -> None:
    """A GGUF's pages are released tensor by tensor, so the load peak is not model + whole file."""
    import llamaserve.loader.gguf as gguf_loader

    if not release:  # the control: without the release every page read stays resident
        monkeypatch.setattr(gguf_loader, "_drop_pages", lambda *args: None)
    source = inspect_model(str(smollm_path))
    size_kb = smollm_path.stat().st_size // 1024
    total = 0
    for _, value in iter_tensors(source.reader, source.config):
        total += value.numel() if isinstance(value, torch.Tensor) else value.q.numel()
    assert total > 100_000_000  # every tensor was read (135 M parameters)
    resident = mapping_rss_kb(source.reader.data.ctypes.data)  # this reader's own map of the file
    assert resident is not None
    print(f"release={release}: file {size_kb} kB, resident after reading it all: {resident} kB")
    assert (resident < size_kb // 10) if release else (resident > size_kb * 9 // 10)


def test_mixed_type_file_in_auto_mode_stays_close_to_the_exact_mode(tmp_path) -> None:
    """Q4_K, Q6_K and Q8_0 tensors (a layer's q, k and v of different types, as in Q4_K_M files) load in
    their own types on our kernels; logits within 3% (int8 activation rounding) of the exact mode's."""
    from llamaserve.model import native
    from llamaserve.model.quant import GGUFLinear, QuantizedEmbedding

    if not native.available():
        pytest.skip("native kernels unavailable here")
    big = tiny_hf_model(seed=4, hidden_size=256, intermediate_size=512, head_dim=64, initializer_range=0.05)
    tensors = gguf_tensors(big, QT.F32)
    kinds = [QT.Q4_K, QT.Q6_K, QT.Q8_0]
    rng = np.random.default_rng(1)
    for i, (name, (data, _)) in enumerate(sorted(tensors.items())):
        if data.ndim == 2:
            qtype = kinds[i % 3]
            if qtype == QT.Q8_0:
                blocks = quantize(data, qtype)
            else:  # random values; scales small enough that weights stay near the model's (|w| < 0.06)
                blocks = random_k_blocks(rng, *data.shape, qtype).reshape(-1, GGML_QUANT_SIZES[qtype][1])
                for off in K_SCALE_OFFSETS[qtype]:
                    scale = rng.uniform(2e-5, 6e-5, blocks.shape[0]).astype(np.float16)
                    blocks[:, off : off + 2] = scale.view(np.uint8).reshape(-1, 2)
                blocks = blocks.reshape(data.shape[0], -1)
            tensors[name] = (blocks, qtype)
    path = write_gguf(tmp_path / "mixed.gguf", big.config, tensors)
    exact, _ = load_model(str(path), quantization="none")
    auto, _ = load_model(str(path))
    weights = [m.native_weight for m in auto.modules() if isinstance(m, GGUFLinear)]
    assert len(weights) == 4 * big.config.num_hidden_layers + 1  # every linear, the head included
    assert max(len(w.parts) for w in weights) >= 2  # fused pieces of different types side by side
    assert {t for w in weights for t in w.types()} == {"Q4_K", "Q6_K", "Q8_0"}
    assert isinstance(auto.tok_embeddings, QuantizedEmbedding)
    ref, ours = forward_logits(exact, IDS), forward_logits(auto, IDS)
    err = rel_err(ours, ref)
    agree = float((ours.argmax(-1) == ref.argmax(-1)).float().mean())
    print(f"mixed Q4_K/Q6_K/Q8_0 file, auto vs none: max relative logit error {err:.2e}, top-1 {agree:.0%}")
    assert err < 3e-2 and agree >= 0.9


def memmaps_under(array: np.ndarray) -> list[np.memmap]:
    """The np.memmap objects in an array's chain of bases (empty for memory of its own)."""
    found, base = [], array
    while base is not None:
        if isinstance(base, np.memmap):
            found.append(base)
        base = getattr(base, "base", None)
    return found


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_a_quantized_token_embedding_is_read_from_the_file_map(tmp_path) -> None:
    """The default mode's embedding is a read-only map of the file's bytes, not a copy; a lookup gives
    gguf's dequantized rows and leaves none of the map resident; the model's logits are those of a copy
    of the table, and the tied head packed from the same tensor stays near the exact mode's."""
    from llamaserve.model import native
    from llamaserve.model.quant import GGUFLinear, QuantizedEmbedding, RawTensor
    from llamaserve.sysmem import file_map

    if not native.available():
        pytest.skip("native kernels unavailable here")
    tied = tiny_hf_model(seed=5, tie_word_embeddings=True)
    path = write_gguf(tmp_path / "tied-q8.gguf", tied.config, gguf_tensors(tied, QT.Q8_0))
    auto, source = load_model(str(path))
    assert source.config.tie_word_embeddings and isinstance(auto.output, GGUFLinear)
    emb = auto.tok_embeddings
    assert isinstance(emb, QuantizedEmbedding) and emb.table is not None
    table = emb.table.data
    maps = memmaps_under(table)
    assert maps and Path(maps[-1].filename) == path.resolve()
    assert not table.flags.writeable and emb.file_map is file_map(table) is not None
    ids = [0, 7, 255, 7, 128]
    got = emb(torch.tensor(ids))
    assert mapping_rss_kb(table.ctypes.data) == 0  # the pages the lookup mapped were dropped
    rows = next(t for t in GGUFReader(path).tensors if t.name == "token_embd.weight").data
    assert torch.equal(got, torch.from_numpy(dequantize(np.asarray(rows)[ids], QT.Q8_0)))
    mapped = forward_logits(auto, IDS)
    emb.load(RawTensor(QT.Q8_0, np.array(table), emb.table.cols))  # a copy in our memory, as before
    assert emb.file_map is None and torch.equal(forward_logits(auto, IDS), mapped)
    exact, _ = load_model(str(path), quantization="none")
    assert rel_err(mapped, forward_logits(exact, IDS)) < 0.1  # int8 activations (0.060 before the map too)


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_embedding_lookups_leave_no_page_of_the_map_resident(smollm_path) -> None:
    """A fault maps a whole large page-cache folio (where the page cache has them): without the drop a few
    hundred random tokens kept most of SmolLM2's 29 MB table in our RSS. Each lookup drops what it mapped."""
    from llamaserve.model.quant import QuantizedEmbedding, RawTensor

    source = inspect_model(str(smollm_path))
    t = next(t for t in source.reader.tensors if t.name == "token_embd.weight")
    data = map_rows(source.reader, t)
    rows, cols = data.shape[0], int(t.shape[0])
    emb = QuantizedEmbedding(rows, cols)
    emb.load(RawTensor(t.tensor_type, data, cols))
    rng = np.random.default_rng(0)
    for _ in range(8):
        ids = rng.integers(0, rows, 64)
        out = emb(torch.from_numpy(ids))
    assert mapping_rss_kb(data.ctypes.data) == 0
    expected = dequantize(np.asarray(t.data)[ids], t.tensor_type)
    assert torch.equal(out, torch.from_numpy(expected.reshape(len(ids), cols)))
    _ = data[rng.integers(0, rows, 512)]  # the same reads, not dropped (printed: kernel-dependent)
    print(f"512 rows read without the drop: {mapping_rss_kb(data.ctypes.data)} kB resident of "
          f"{data.nbytes // 1024} kB")


def test_loading_imports_neither_dynamo_nor_sympy(tmp_path, model) -> None:
    """Building the model on the meta device must not run ops through torch's Python reference code:
    it imports torch._dynamo and sympy, ~66 MB of RSS for the server's life (measured)."""
    path = write_gguf(tmp_path / "tiny-q8.gguf", model.config, gguf_tensors(model, QT.Q8_0))
    model.save_pretrained(tmp_path / "hf")
    code = ("import sys\nfrom llamaserve.loader.weights import load_model\n"
            "for mode in ('auto', 'none', 'int4', 'int8'):\n"
            f"    load_model({str(path)!r}, quantization=mode)\n"
            f"load_model({str(tmp_path / 'hf')!r})\n"
            "print([m for m in ('torch._dynamo', 'sympy') if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_the_model_draws_the_same_random_weights_as_before() -> None:
    """The embedding is built without nn.Embedding's own init (see Transformer): the same normal_ draw."""
    from llamaserve.model.llama import Transformer

    cfg = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    net: Any = Transformer(cfg)
    torch.manual_seed(0)
    ref = torch.nn.Embedding(300, 64)
    assert torch.equal(net.tok_embeddings.weight, ref.weight) and net.tok_embeddings.weight.requires_grad
