"""The sampler's cost per step with default sampling (temperature 1, no top-k/top-p), per batch size.

    .venv/bin/python benchmarks/sampler.py [--vocab 49152] [--threads 2]

Ours (`Sampler.sample`: softmax, then one uniform per row and a two-level inverse CDF) against the
exponential race it replaced (argmax of p / q with q ~ Exp(1): V random numbers a row), run here on the
same logits. Median of 30 steps each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llamaserve.engine.sampler import Sampler
from llamaserve.engine.sampling_params import SamplingParams
from llamaserve.engine.sequence import Sequence


def exponential_race(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    probs = torch.softmax(logits, dim=-1)
    q = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(torch.finfo(torch.float32).tiny)
    return probs.div_(q).argmax(dim=-1)


def median_ms(fn, steps: int = 30) -> float:  # noqa: ANN001
    fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sampler = Sampler(args.vocab, [0], seed=0)
    generator = torch.Generator().manual_seed(0)
    print("| batch | ours, whole sample() (ms) | exponential race, the draw alone (ms) |")
    print("|---|---|---|")
    for batch in (1, 4, 16, 64):
        logits = torch.randn(batch, args.vocab, generator=generator) * 3
        seqs = [Sequence(i, f"r{i}", [1, 2, 3], 3, SamplingParams(max_tokens=8)) for i in range(batch)]
        ours = median_ms(lambda: sampler.sample(logits, seqs))  # noqa: B023
        race = median_ms(lambda: exponential_race(logits, generator))  # noqa: B023
        print(f"| {batch} | {ours:.2f} | {race:.2f} |")


if __name__ == "__main__":
    main()
