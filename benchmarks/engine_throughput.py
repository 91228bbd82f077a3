"""Offline engine throughput on the embedded model at batch 1, 16 and 64 (writes a BENCHMARKS.md section).

Usage: .venv/bin/python benchmarks/engine_throughput.py [--batches 1 16 64] [--max-tokens 128] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from llamaserve.config import EngineConfig
from llamaserve.engine.llm_engine import LLMEngine
from llamaserve.engine.sampling_params import SamplingParams
from llamaserve.model import native

TOPICS = ["the ocean", "a robot", "autumn", "a lighthouse", "mountains", "a city at night", "coffee",
          "the moon", "a library", "trains", "a garden", "winter", "music", "a desert", "friendship",
          "rain"]


def run(engine: LLMEngine, batch: int, max_tokens: int) -> dict[str, float]:
    prompts = [engine.tokenizer.encode_chat([{"role": "user", "content": f"Write a story about "
                                              f"{TOPICS[i % len(TOPICS)]} (#{i})."}]) for i in range(batch)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    engine.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o[0]) for o in outs)
    return {"batch": batch, "output_tokens": tokens, "seconds": round(elapsed, 2),
            "tokens_per_s": round(tokens / elapsed, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantization", default="auto", help="auto | none | int4 | int8")
    ap.add_argument("--compile", action="store_true", help="torch.compile the forward (EngineConfig.compile)")
    ap.add_argument("--out", default="", help="also write the markdown section to this file")
    args = ap.parse_args()
    start = time.perf_counter()
    engine = LLMEngine.from_model(None, EngineConfig(
        kv_cache_memory=2.0, max_num_seqs=64, dtype=args.dtype, quantization=args.quantization,
        compile=args.compile))
    startup = time.perf_counter() - start
    rows = [run(engine, b, args.max_tokens) for b in args.batches]
    dtype = str(engine.runner.model.dtype).removeprefix("torch.")
    model = engine.runner.model
    kernels = "" if args.quantization == "none" else (
        f", {native.info()}" + (", fused decode" if engine.runner.fused is not None else "")
        if any(getattr(m, "native_weight", None) is not None for m in model.modules())
        else ", torch's kernels")
    env = "LLAMASERVE_NATIVE=0 " if os.environ.get("LLAMASERVE_NATIVE") == "0" else ""
    lines = [
        f"### Engine throughput (offline, embedded SmolLM2-135M-Instruct Q4_1, "
        f"quantization {args.quantization}{kernels}{', compiled' if args.compile else ''})",
        "",
        f"Machine: {native.cpu_description()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, activations {dtype}, quantization {args.quantization}. Greedy, "
        f"ignore_eos, {args.max_tokens} tokens each. "
        f"Start-up (load{' and compile' if args.compile else ''}): {startup:.1f} s.",
        f"Command: `{env}.venv/bin/python benchmarks/engine_throughput.py --batches "
        f"{' '.join(map(str, args.batches))} --max-tokens {args.max_tokens} "
        f"--quantization {args.quantization}{' --compile' if args.compile else ''}`",
        "",
        "| batch | output tokens | seconds | tokens/s | vs batch 1 |",
        "|---|---|---|---|---|",
    ]
    base = rows[0]["tokens_per_s"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['output_tokens']} | {r['seconds']} | {r['tokens_per_s']} | "
                     f"{r['tokens_per_s'] / base:.1f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    print(json.dumps(rows))
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
