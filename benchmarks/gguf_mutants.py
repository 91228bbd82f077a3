"""GGUF mutants for `make stress`: broken copies of a small Llama-2-style file, each loaded by the real CLI.

    .venv/bin/python benchmarks/gguf_mutants.py [--count 200] [--seed 0] [--memory-gib 2]

The source is written here: Llama 2's layout and metadata (SentencePiece vocabulary with scores and
token types, BOS/EOS ids, Q8_0 and F32 tensors) at a tiny size, so that a mutant loads in about a second
(the embedded model's 49,152-token vocabulary takes the gguf reader ~8 s to parse; the checks run on the
same code whatever the size). Half structural (a cut anywhere, flipped header bytes, huge counts, string
and array lengths, bad tensor dims, types and offsets, another version), half metadata (llama.* and
tokenizer values set to 0, 1, 2^31, 2^32-1, NaN, inf, -1, ids outside the vocabulary, another
architecture). Every mutant is run as `llamaserve generate --model MUTANT --max-tokens 1 hi` in a child
process forked from one that has imported llamaserve already (no 10 s start per mutant), under RLIMIT_AS
= the child's address space at fork + --memory-gib. Pass: exit 2 with one line `llamaserve: error: ...`
(or exit 0: a mutant that is still a valid model); fail: anything else (a traceback, a signal, a hang
past 120 s, a second line).
"""

from __future__ import annotations

import argparse
import io
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFReader

Mutation = Callable[[Path, random.Random], str]  # edits the copy in place, returns what it did


def source_gguf(path: Path, seed: int = 0) -> Path:
    """A valid tiny llama GGUF: 2 blocks, hidden 64, 4 heads (2 KV), a 512-piece SentencePiece vocabulary."""
    import gguf

    rng = np.random.default_rng(seed)
    hidden, ffn, blocks, heads, kv_heads, head_dim = 64, 128, 2, 4, 2, 16
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"\u2581{w}" for w in ("the", "a", "and", "of", "to", "in", "is", "it", "hi", "you")]
    tokens += [f"\u2581w{i}" for i in range(512 - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259)  # unknown, control, byte, normal
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("mutant-source")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(blocks)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def tensor(name: str, *shape: int, quantized: bool = True) -> None:
        data = rng.standard_normal(shape).astype(np.float32) * 0.1
        if quantized:
            w.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, data)

    tensor("token_embd.weight", len(tokens), hidden)
    tensor("output_norm.weight", hidden, quantized=False)
    tensor("output.weight", len(tokens), hidden)
    for i in range(blocks):
        tensor(f"blk.{i}.attn_norm.weight", hidden, quantized=False)
        tensor(f"blk.{i}.ffn_norm.weight", hidden, quantized=False)
        tensor(f"blk.{i}.attn_q.weight", heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, heads * head_dim)
        tensor(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_up.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, ffn)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _reader(path: Path) -> GGUFReader:
    return GGUFReader(path, "r+")


def _header_end(path: Path) -> int:
    return int(GGUFReader(path).data_offset)


def cut(path: Path, rng: random.Random) -> str:
    size = path.stat().st_size
    at = rng.choice([rng.randrange(0, 64), rng.randrange(0, _header_end(path)), rng.randrange(0, size)])
    with open(path, "r+b") as f:
        f.truncate(at)
    return f"cut at byte {at} of {size}"


def flip_header_bytes(path: Path, rng: random.Random) -> str:
    end = _header_end(path)
    offsets = [rng.randrange(4, end) for _ in range(rng.choice([1, 2, 8]))]
    with open(path, "r+b") as f:
        for at in offsets:
            f.seek(at)
            byte = f.read(1)[0]
            f.seek(at)
            f.write(bytes([byte ^ (1 << rng.randrange(8))]))
    return f"flipped a bit in header bytes {offsets}"


def header_counts(path: Path, rng: random.Random) -> str:
    at, name = rng.choice([(8, "tensor count"), (16, "metadata count")])
    value = rng.choice([0, 2**63 - 1, 2**32, 10**6])
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(int(value).to_bytes(8, "little"))
    return f"{name} {value}"


def version(path: Path, rng: random.Random) -> str:
    value = rng.choice([0, 1, 2, 4, 2**31])
    with open(path, "r+b") as f:
        f.seek(4)
        f.write(int(value).to_bytes(4, "little"))
    return f"version {value}"


def string_length(path: Path, rng: random.Random) -> str:
    r = _reader(path)
    field = rng.choice(list(r.fields.values()))
    value = rng.choice([2**63, 2**40, 10**9])
    field.parts[0][0] = value  # the key's length
    return f"key length of {field.name} set to {value}"


def array_length(path: Path, rng: random.Random) -> str:
    r = _reader(path)
    arrays = [f for f in r.fields.values() if len(f.parts) > 4 and len(f.data) > 1]
    field = rng.choice(arrays)
    value = rng.choice([0, 2**62, 10**9, len(field.data) + 1])
    field.parts[4][0] = value  # key_len, key, type, item type, item count
    return f"{field.name}: array length {value}"


def tensor_info(path: Path, rng: random.Random) -> str:
    r = _reader(path)
    t = rng.choice(r.tensors)
    parts = t.field.parts  # name length, name, n_dims, dims, type, offset
    what = rng.choice(["dims", "n_dims", "type", "offset"])
    if what == "dims":
        value = rng.choice([0, 1, 2**40, 2**63 - 1])
        parts[3][rng.randrange(len(parts[3]))] = value
    elif what == "n_dims":
        value = rng.choice([0, 5, 2**31])
        parts[2][0] = value
    elif what == "type":
        value = rng.choice([4, 5, 99, 2**31])
        parts[4][0] = value
    else:
        value = rng.choice([2**62, path.stat().st_size, 1])
        parts[5][0] = value
    return f"tensor {t.name}: {what} {value}"


NUMERIC_KEYS = ("llama.block_count", "llama.context_length", "llama.embedding_length",
                "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
                "llama.rope.dimension_count", "llama.vocab_size", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
                "tokenizer.ggml.unknown_token_id")
FLOAT_KEYS = ("llama.attention.layer_norm_rms_epsilon", "llama.rope.freq_base")


def metadata_value(path: Path, rng: random.Random) -> str:
    r = _reader(path)
    present = [k for k in NUMERIC_KEYS + FLOAT_KEYS if k in r.fields]
    key = rng.choice(present)
    part = r.fields[key].parts[r.fields[key].data[0]]
    if np.issubdtype(part.dtype, np.floating):
        value: float = rng.choice([float("nan"), float("inf"), -1.0, 0.0, 1e30])
    else:
        top = np.iinfo(part.dtype).max
        value = rng.choice([0, 1, min(2**31, top), top, 511, 512, 513, 2**16])
    part[0] = value
    return f"{key} = {value}"


def architecture(path: Path, rng: random.Random) -> str:
    r = _reader(path)
    field = r.fields["general.architecture"]
    text = field.parts[field.data[0]]
    new = rng.choice([b"gpt2x", b"llam\x00", b"LLAMA", b"\xff\xfe\xfd\xfc\xfb"])[: len(text)]
    text[: len(new)] = np.frombuffer(new, dtype=np.uint8)
    return f"general.architecture bytes {new!r}"


STRUCTURAL: list[Mutation] = [cut, flip_header_bytes, header_counts, version, string_length, array_length,
                              tensor_info]
METADATA: list[Mutation] = [metadata_value, metadata_value, metadata_value, architecture]


@dataclass
class Outcome:
    kind: str
    what: str
    code: int | None  # None: killed after the time limit
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        """Exit 0, or exit 2 with the error as one last line (after the loading bar, if any) and no
        traceback."""
        lines = self.stderr.strip().splitlines()
        if "Traceback" in self.stderr:
            return False
        if self.code == 2:
            return bool(lines) and lines[-1].startswith("llamaserve: error: ") and all(
                "llamaserve: error" not in line for line in lines[:-1])
        return self.code == 0


def run_cli(model: Path, memory_gib: float, timeout: float = 120.0) -> tuple[int | None, str]:
    """The CLI on `model` in a forked child under an address-space limit: (exit code, stderr)."""
    from llamaserve import cli

    read, write = os.pipe()
    sys.stderr.flush()
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:  # the child: no return from here
        os.close(read)
        code = 70
        try:
            with open(f"/proc/{os.getpid()}/status") as f:
                vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
            limit = vm + int(memory_gib * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            err = io.StringIO()
            with redirect_stderr(err), redirect_stdout(io.StringIO()):
                try:
                    code = cli.main(["generate", "--model", str(model), "--max-tokens", "1",
                                     "--kv-cache-memory", "0.01", "hi"])
                except BaseException:  # a traceback is a failure: show it as the CLI would have
                    import traceback
                    traceback.print_exc()
                    code = 1
            os.write(write, err.getvalue().encode(errors="replace")[-4000:])
        finally:
            os._exit(code)
    os.close(write)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read)
            return None, "killed after the time limit"
        time.sleep(0.02)
    with os.fdopen(read, "rb") as f:
        stderr = f.read().decode(errors="replace")
    return (os.waitstatus_to_exitcode(status), stderr)


def run(count: int, seed: int, memory_gib: float) -> list[Outcome]:
    import transformers.models.llama  # noqa: F401  (imported once here, not in every forked child)
    from transformers import AutoTokenizer  # noqa: F401
    from transformers.integrations import ggml  # noqa: F401

    rng = random.Random(seed)
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="llamaserve-mutants-") as tmp:
        os.environ["LLAMASERVE_CACHE"] = str(Path(tmp) / "cache")  # no tokenizer caches left behind
        source = source_gguf(Path(tmp) / "source.gguf", seed)
        code, stderr = run_cli(source, memory_gib)
        if code != 0:
            raise SystemExit(f"the mutants' source does not load (exit {code}): {stderr.strip()[-500:]}")
        for i in range(count):
            kind, pool = ("structural", STRUCTURAL) if i % 2 == 0 else ("metadata", METADATA)
            path = Path(tmp) / f"mutant{i}.gguf"
            shutil.copyfile(source, path)
            what = rng.choice(pool)(path, rng)
            start = time.perf_counter()
            code, stderr = run_cli(path, memory_gib)
            outcomes.append(Outcome(kind, what, code, stderr, time.perf_counter() - start))
            path.unlink()
    return outcomes


def summary(outcomes: list[Outcome], memory_gib: float) -> list[str]:
    failed = [o for o in outcomes if not o.ok]
    refused = sum(o.code == 2 for o in outcomes)
    loaded = sum(o.code == 0 for o in outcomes)
    lines = [f"- {len(outcomes)} GGUF mutants ({sum(o.kind == 'structural' for o in outcomes)} structural, "
             f"{sum(o.kind == 'metadata' for o in outcomes)} metadata) through `llamaserve generate`, each "
             f"under an address-space limit of +{memory_gib:g} GiB: {refused} refused with one line and exit "
             f"2, {loaded} still valid models (exit 0), **{len(failed)} failures**; slowest "
             f"{max(o.seconds for o in outcomes):.1f} s"]
    for o in failed[:10]:
        tail = o.stderr.strip().splitlines()[-1:] or [""]
        lines.append(f"  - FAILED {o.kind} `{o.what}`: exit {o.code}, {tail[0][:200]}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--memory-gib", type=float, default=2.0)
    args = ap.parse_args()
    outcomes = run(args.count, args.seed, args.memory_gib)
    print("\n".join(summary(outcomes, args.memory_gib)))
    sys.exit(0 if all(o.ok for o in outcomes) else 1)


if __name__ == "__main__":
    main()
