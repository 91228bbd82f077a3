"""Two builds of our kernels in one process, alternated round by round: which is faster, and do they
give the same bits.

These machines run 20-40% slower in some stretches than in others, so two timings taken minutes apart
(two processes, two server runs) cannot show a 10% change. Here both libraries are loaded at once and
run the same calls on the same buffers, in turn, swapping which goes first every round; a case's figure
is the median over rounds of B's time / A's time, and its outputs are compared bit for bit.

A is the kernel sources of a git revision (--base); B those of another (--head) or, by default, the
working tree's (the library the server would load now). Both are built for the variant this CPU gets
and must share the C ABI. The weights are a GGUF file's own (default: the embedded model):

- `layers M=m`: every linear of the first --layers layers (all by default) at m activation rows; with
  all layers and m = 1 the weights stream from DRAM as in a decode step;
- `head M=m`: the output projection (the token embedding where the file ties them); alone, a small
  model's head may stay in the L3 cache from one round to the next;
- `layers + head M=m`: both, in a decode step's order (the head read after the layers, as served);
- `decode attention B=b`: a decode step's attention over one bfloat16 pool per layer, b sequences of
  60-159 tokens in shuffled blocks, the file's head counts and head size;
- `decode step B=b`: a whole fused decode step (all layers in one call, the head not included) of the
  model as the engine loads it, b sequences as above (not with --layers).

    .venv/bin/python benchmarks/kernel_ab.py --base HEAD~1 [--head REV] [--gguf FILE] [--rows 1 16 64]
"""

from __future__ import annotations

import argparse
import ctypes
import random
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader

from llamaserve.model import formats, native
from llamaserve.model.kv_cache import build_metadata

REPO = Path(__file__).resolve().parent.parent
CSRC = "llamaserve/model/csrc"


def sources_at(rev: str, dest: Path) -> list[Path]:
    """The kernel sources of a git revision, written to dest."""
    def git(*args: str) -> bytes:
        proc = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True)
        if proc.returncode:
            raise SystemExit(f"kernel_ab: no kernel sources at {rev!r}: {proc.stderr.decode().strip()}")
        return proc.stdout

    out = []
    for name in git("ls-tree", "--name-only", f"{rev}:{CSRC}").decode().split():
        (dest / name).write_bytes(git("show", f"{rev}:{CSRC}/{name}"))
        out.append(dest / name)
    return out


def build_at(rev: str, variant: str, dest: Path) -> Path:
    """A revision's kernels, compiled with native.py's flags by `cc` (the working tree's build, which
    honours $CC as the server's does, can so differ by a wrapper's -D flags alone)."""
    sources_at(rev, dest)
    lib = dest / f"kernels-{variant}.so"
    cmd = ["cc", *native._BASE_FLAGS, *native.VARIANTS[variant][0], "-o", str(lib),
           *(str(dest / s) for s in native._SOURCES)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"kernel_ab: building {rev} failed: {proc.stderr.strip()[-400:]}")
    return lib


def load(path: Path, variant: str) -> ctypes.CDLL:
    """The library, refused loudly when its ABI or variant differs from this checkout's."""
    try:
        return native._bind(path, variant)
    except OSError as e:
        raise SystemExit(f"kernel_ab: {e}") from None


@dataclass
class Case:
    name: str
    run: Callable[[ctypes.CDLL], list[torch.Tensor]]  # one timed call: its outputs


@dataclass
class Row:
    name: str
    a_ms: float
    b_ms: float
    ratio: float  # median over rounds of B's time / A's time
    same: bool


def compare(a: ctypes.CDLL, b: ctypes.CDLL, cases: list[Case], rounds: int) -> list[Row]:
    rows = []
    for case in cases:
        outs = {"a": case.run(a), "b": case.run(b)}  # (also a warm-up)
        times: dict[str, list[float]] = {"a": [], "b": []}
        for r in range(rounds):
            for key in ("a", "b") if r % 2 == 0 else ("b", "a"):
                start = time.perf_counter()
                case.run(a if key == "a" else b)
                times[key].append(time.perf_counter() - start)
        same = all(torch.equal(x, y) for x, y in zip(outs["a"], outs["b"], strict=True))
        ratio = statistics.median(tb / ta for ta, tb in zip(times["a"], times["b"], strict=True))
        rows.append(Row(case.name, statistics.median(times["a"]) * 1e3, statistics.median(times["b"]) * 1e3,
                        ratio, same))
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| case | A ms (median) | B ms (median) | B / A (median of rounds) | same bits |",
             "|---|---|---|---|---|"]
    lines += [f"| {r.name} | {r.a_ms:.3f} | {r.b_ms:.3f} | {r.ratio:.3f} | {'yes' if r.same else '**no**'} |"
              for r in rows]
    return "\n".join(lines)


def _weight(reader_tensor) -> native.NativeWeight:  # noqa: ANN001
    qtype = QT(int(reader_tensor.tensor_type))
    n, k = (int(d) for d in reversed(reader_tensor.shape.tolist()))
    raw = np.asarray(reader_tensor.data).reshape(n, -1)
    return native.NativeWeight(k, [(qtype, formats.pack(qtype, formats.unpack(qtype, raw, n, k)))])


def matmul_case(name: str, weights: list[native.NativeWeight], m: int) -> Case:
    xs = {w.k: torch.randn(m, w.k, generator=torch.Generator().manual_seed(w.k)) for w in weights}
    ys = [torch.empty(m, w.n) for w in weights]

    def run(lib: ctypes.CDLL) -> list[torch.Tensor]:
        for w, y in zip(weights, ys, strict=True):
            if lib.ls_matmul(w.address, xs[w.k].data_ptr(), m, y.data_ptr()):
                raise SystemExit(f"kernel_ab: {name}: ls_matmul refused its arguments")
        return [y.clone() for y in ys]

    return Case(name, run)


def contexts(batch: int, bs: int, blocks: int) -> list[tuple[list[int], int, int]]:
    """A decode step's chunks: `batch` sequences of 60-159 tokens (the last one new) in shuffled blocks
    of a pool of `blocks` (block 0 left out: it pads context rows)."""
    per_seq = -(-160 // bs)
    order = list(range(1, blocks))
    if len(order) < batch * per_seq:
        raise SystemExit(f"kernel_ab: a pool of {blocks} blocks holds too few for {batch} sequences")
    random.Random(0).shuffle(order)
    return [(order[i * per_seq:(i + 1) * per_seq], 59 + (i * 7) % 100, 1) for i in range(batch)]


def attention_case(batch: int, layers: int, heads: int, kv_heads: int, dim: int) -> Case:
    bs = 16
    blocks = batch * -(-160 // bs) + 1
    g = torch.Generator().manual_seed(0)
    shape = (blocks * bs, 2 * kv_heads, dim)
    pools = [native.NativeKV((torch.randn(shape, generator=g) * 3).to(torch.bfloat16), None)
             for _ in range(layers)]
    meta = build_metadata(contexts(batch, bs, blocks), bs)
    q = torch.randn(batch, heads, dim, generator=g)
    ql, slots, lens = (t.to(torch.int64).contiguous() for t in (meta.q_lens, meta.ctx_slots, meta.ctx_lens))
    out = torch.empty(batch, heads * dim)

    def run(lib: ctypes.CDLL) -> list[torch.Tensor]:
        for p in pools:
            rc = lib.ls_attention(p.address, q.data_ptr(), heads * dim, heads, batch, ql.data_ptr(),
                                  slots.data_ptr(), slots.shape[1], lens.data_ptr(), out.data_ptr(),
                                  heads * dim)
            if rc:
                raise SystemExit("kernel_ab: ls_attention refused its arguments")
        return [out.clone()]

    return Case(f"decode attention B={batch}", run)


def decode_case(path: Path, batch: int) -> Case:
    """A whole fused decode step (every layer, one call), as the engine runs it: the model loaded by the
    engine, `batch` sequences of 60-159 tokens in shuffled blocks of its KV pool."""
    from llamaserve.config import EngineConfig
    from llamaserve.engine.llm_engine import LLMEngine

    runner = LLMEngine.from_model(str(path), EngineConfig()).runner
    if runner.fused is None:
        raise SystemExit(f"kernel_ab: {path.name} does not run fused on this machine")
    bs = runner.config.block_size
    chunks = contexts(batch, bs, runner.cache.num_slots // bs)
    meta = build_metadata(chunks, bs)
    used = torch.tensor([b * bs + i for table, _, _ in chunks for b in table for i in range(bs)])
    g = torch.Generator().manual_seed(1)
    for pool in runner.cache.kv:  # (a fresh pool holds whatever its pages held)
        pool[used] = torch.randn(len(used), *pool.shape[1:], generator=g).to(pool.dtype)
    fused, model = runner.fused, runner.model
    ids = torch.randint(0, model.config.vocab_size, (batch,), generator=torch.Generator().manual_seed(0))
    x0, cos, sin = model.embed(ids, meta.ctx_lens - 1)
    layers, dim, heads, kv_heads, head_dim, inter = fused.shape
    cos, sin = cos.reshape(batch, head_dim).contiguous(), sin.reshape(batch, head_dim).contiguous()
    slots, ctx, lens = (t.to(torch.int64).contiguous()
                        for t in (meta.slot_mapping, meta.ctx_slots, meta.ctx_lens))
    cfg = torch.tensor([layers, batch, dim, heads, kv_heads, head_dim, inter, ctx.shape[1], fused.final_norm])
    table = fused._pointers(runner.cache.native)

    def run(lib: ctypes.CDLL) -> list[torch.Tensor]:
        x = x0.contiguous().clone()
        # (runner.cache holds the pools, runner.model the weights: both must outlive this call)
        if runner.cache.native is None or lib.ls_decode_layers(
                cfg.data_ptr(), ctypes.c_float(fused.eps), x.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                slots.data_ptr(), ctx.data_ptr(), lens.data_ptr(), table.data_ptr()):
            raise SystemExit("kernel_ab: ls_decode_layers refused its arguments")
        return [x]

    return Case(f"decode step B={batch}", run)


def cases_from(path: Path, rows: list[int], batches: list[int], max_layers: int | None) -> list[Case]:
    try:
        reader = GGUFReader(path)
    except (OSError, ValueError) as e:
        raise SystemExit(f"kernel_ab: {path}: not a readable GGUF file ({e})") from None
    fields = {f.name: f.parts[f.data[0]].tolist()[0] for f in reader.fields.values() if f.data}
    tensors = {t.name: t for t in reader.tensors}
    need = ("llama.block_count", "llama.attention.head_count", "llama.attention.head_count_kv",
            "llama.embedding_length")
    if any(k not in fields for k in need) or "token_embd.weight" not in tensors:
        raise SystemExit(f"kernel_ab: {path.name} is not a llama GGUF file (no {', '.join(need)})")
    count = int(fields["llama.block_count"])
    if max_layers is not None and not 1 <= max_layers <= count:
        raise SystemExit(f"kernel_ab: --layers must be 1..{count} for {path.name}, got {max_layers}")
    n_layers = count if max_layers is None else max_layers
    linears = [_weight(t) for name, t in tensors.items()
               if name.startswith("blk.") and int(name.split(".")[1]) < n_layers and len(t.shape) == 2
               and QT(int(t.tensor_type)) in formats.FORMATS]  # (our kernels' types)
    head_t = tensors.get("output.weight", tensors["token_embd.weight"])
    head = [_weight(head_t)] if QT(int(head_t.tensor_type)) in formats.FORMATS else []  # (else: dense)
    heads, kv_heads = int(fields["llama.attention.head_count"]), int(fields["llama.attention.head_count_kv"])
    dim = int(fields["llama.embedding_length"]) // heads
    cases = [matmul_case(f"layers M={m}", linears, m) for m in rows]
    if head:
        cases += [matmul_case(f"head M={m}", head, m) for m in rows]
        cases += [matmul_case(f"layers + head M={m}", [*linears, *head], m) for m in rows]  # (a step's order)
    cases += [attention_case(b, n_layers, heads, kv_heads, dim) for b in batches]
    if max_layers is None:
        cases += [decode_case(path, b) for b in batches]
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="git revision of A's kernel sources")
    ap.add_argument("--head", help="git revision of B's (default: the working tree)")
    ap.add_argument("--gguf", type=Path, help="weights (default: the embedded model)")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64], help="activation rows of the matmuls")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64], help="sequences of the attention")
    ap.add_argument("--layers", type=int, help="layers to take (default: all)")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    if min(args.rows) < 1 or min(args.batch) < 1 or args.rounds < 1:
        ap.error("--rows, --batch and --rounds take positive numbers")
    variant = native.kernels().variant
    if variant is None:
        raise SystemExit(f"kernel_ab: no native kernels here: {native.kernels().reason}")
    if args.gguf is None:
        from llamaserve.loader.registry import resolve_model  # (the embedded file)

        args.gguf = Path(resolve_model(None))
    with tempfile.TemporaryDirectory() as tmp:
        dirs = Path(tmp, "a"), Path(tmp, "b")
        for d in dirs:
            d.mkdir()
        a = load(build_at(args.base, variant, dirs[0]), variant)
        b = load(build_at(args.head, variant, dirs[1]) if args.head else native._build(variant), variant)
        torch.manual_seed(0)
        rows = compare(a, b, cases_from(args.gguf, args.rows, args.batch, args.layers), args.rounds)
    print(f"A: {args.base}; B: {args.head or 'the working tree'}; kernels {variant}, "
          f"{native.cpu_description()}, {torch.get_num_threads()} threads; weights {args.gguf.name}; "
          f"{args.rounds} rounds\n")
    print(table(rows))


if __name__ == "__main__":
    main()
