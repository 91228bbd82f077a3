"""Attention over the KV pool on our kernels, Llama 2 7B's shapes (32 heads of 128, no GQA), per dtype.

    .venv/bin/python benchmarks/kv_attention.py [--context 3000] [--threads 2]

Decode: one query at `--context` tokens, one layer's pool reused for 32 calls (partly cache resident;
a served step reads 32 different pools). Prefill: one 512-token chunk ending at `--context`, x 32.
"""

from __future__ import annotations

import argparse
import time

import torch

from llamaserve.model.kv_cache import PagedKVCache, build_metadata


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    blocks = -(-(args.context + 16) // 16)
    for dtype in (torch.bfloat16, torch.int8, torch.float32):
        cache = PagedKVCache(1, blocks, 16, 32, 128, dtype)
        cache.use_native()
        cache.write(0, torch.arange(blocks * 16), torch.randn(blocks * 16, 64, 128))
        table = list(range(blocks))
        meta = build_metadata([(table, args.context - 1, 1)], 16)
        q = torch.randn(1, 32, 128)
        cache.attend(0, q, meta)
        start = time.perf_counter()
        for _ in range(32):
            cache.attend(0, q, meta)
        decode = time.perf_counter() - start
        meta = build_metadata([(table, args.context - 512, 512)], 16)
        start = time.perf_counter()
        cache.attend(0, torch.randn(512, 32, 128), meta)
        prefill = (time.perf_counter() - start) * 32
        name = str(dtype).removeprefix("torch.")
        print(f"{name:9} decode at {args.context}: {decode * 1000:.1f} ms for 32 layers; a 512-token "
              f"prefill chunk ending there: {prefill:.1f} s for 32 layers")


if __name__ == "__main__":
    main()
