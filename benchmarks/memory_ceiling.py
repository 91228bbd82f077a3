"""The fastest one-stream decode this machine allows: its streaming-read rate / the bytes a token reads.

One decoded token reads every weight once (all of a GGUF file's tensors but the token embedding, of which
it reads one row; a file without `output.weight` reads the embedding as its head). No server can decode
one stream faster than the rate at which the CPU streams those bytes from DRAM, so a target above that
bound cannot be met on this machine, whatever the kernels.

The rate is timed with our kernels' `ls_stream_read` (every thread reads its contiguous half of a buffer
far larger than the caches, as a one-row matmul reads its weights), best of --repeats.

    .venv/bin/python benchmarks/memory_ceiling.py --gguf FILE [--gguf FILE ...] [--markdown BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from gguf import GGUFReader

from llamaserve.model import native

START, END = "<!-- memory-ceiling:start -->", "<!-- memory-ceiling:end -->"


def bytes_per_token(path: Path) -> int:
    """Bytes of weights one decoded token reads from this GGUF file."""
    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: no token_embd.weight; is this a llama GGUF file?")
    embedding = tensors.pop("token_embd.weight")
    return sum(tensors.values()) + (0 if "output.weight" in tensors else embedding)


def read_rates(gib: float, repeats: int) -> list[float]:
    """Bytes per second of `repeats` streaming reads of a `gib` GiB buffer."""
    n = int(gib * 2**30) // 256 * 256
    # Random bytes, every page resident before the timing: weights are not a constant fill, and no
    # merging of identical pages by the host can then flatter the rate. (A torch.ones buffer once read at
    # 45-58 GB/s against 29-34 for random bytes, but random bytes later reached 55 in one repeat too:
    # these VMs have stretches of far higher bandwidth, whatever the buffer.)
    buf = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    native.stream_read(buf)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        native.stream_read(buf)
        rates.append(n / (time.perf_counter() - start))
    return rates


def section(rates: list[float], files: list[Path], threads: int) -> str:
    best, median = max(rates), statistics.median(rates)
    lines = [
        START,
        f"Streaming read on {native.cpu_description()}, {threads} threads, "
        f"kernels {native.kernels().variant}: "
        f"best {best / 1e9:.1f} GB/s, median {median / 1e9:.1f} GB/s of {len(rates)}.",
        "",
        "| file | bytes a token reads | one-stream ceiling at the best rate | at the median |",
        "|---|---|---|---|",
    ]
    for f in files:
        b = bytes_per_token(f)
        lines.append(f"| {f.name} | {b / 1e9:.3f} GB | {best / b:.2f} tok/s | {median / b:.2f} tok/s |")
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, action="append", default=[], help="a GGUF file (repeatable)")
    ap.add_argument("--gib", type=float, default=3.0, help="buffer size, far above the last-level cache")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown", type=Path, default=None,
                    help=f"replace the section between {START} and {END} in this file")
    args = ap.parse_args()
    if not native.available():
        raise SystemExit(f"memory_ceiling: our kernels are not available here ({native.info()})")
    if args.gib <= 0 or args.repeats < 1 or args.threads < 1:
        raise SystemExit("memory_ceiling: --gib, --repeats and --threads must be positive")
    missing = [str(f) for f in args.gguf if not f.is_file()]
    if missing:
        raise SystemExit(f"memory_ceiling: no such file: {', '.join(missing)}")
    torch.set_num_threads(args.threads)  # our kernels share torch's OpenMP runtime
    text = section(read_rates(args.gib, args.repeats), args.gguf, args.threads)
    print(text)
    if args.markdown is not None:
        doc = args.markdown.read_text() if args.markdown.exists() else ""
        if START in doc and END in doc:
            doc = doc[: doc.index(START)] + text + doc[doc.index(END) + len(END):]
        else:
            doc = doc.rstrip("\n") + "\n\n" + text + "\n"
        args.markdown.write_text(doc)


if __name__ == "__main__":
    main()
