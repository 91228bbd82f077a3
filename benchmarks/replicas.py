"""Ray Serve's cost and prefix routing's gain (issue 16): writes the "Scaling out" section of BENCHMARKS.md.

One machine, one run, the embedded model, each server started as a user would (`llamaserve serve ...`):
1. Routing overhead: time to first token at 1 and 8 concurrent streams for the plain server and for
   `--replicas 1` (the same one engine, behind Ray Serve's proxy, our ingress and a streaming handle),
   and `--replicas 2` for reference (on 2 cores, two engines share the same cores: not a speed-up).
2. Prefix-cache hit rate with 2 replicas, prefix routing on and off: 8 conversations with long system
   prompts of their own, 4 questions each, interleaved, 2 clients; hits / queries from the prefix-cache
   counters of every replica in the deployment's /metrics.

    .venv/bin/python benchmarks/replicas.py            # ~6 minutes here
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stress import ServerProcess  # noqa: E402

from llamaserve.bench.load import BenchConfig, run_bench  # noqa: E402
from llamaserve.bench.report import summarize  # noqa: E402
from llamaserve.model.native import cpu_description  # noqa: E402

FLAGS = ["--kv-cache-memory", "0.25", "--max-model-len", "2048"]
MARK = ("<!-- replicas:start -->", "<!-- replicas:end -->")


def ttft(url: str) -> dict[int, tuple[float, float, float]]:
    """Concurrency -> (TTFT p50 ms, TTFT p99 ms, output tokens/s)."""
    cfg = BenchConfig(base_url=url, concurrency=(1, 8), num_prompts=32, max_tokens=16, ignore_eos=True)
    run = asyncio.run(run_bench(cfg))
    out = {}
    for level in run.levels:
        m = summarize(level)
        assert m.failed == 0, m.errors
        out[m.concurrency or 0] = (m.ttft_ms.p50 or 0.0, m.ttft_ms.p99 or 0.0, m.output_throughput)
    return out


def counters(url: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    total = {}
    for name in ("llamaserve_prefix_cache_hits_total", "llamaserve_prefix_cache_queries_total"):
        total[name] = sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))
    return total["llamaserve_prefix_cache_hits_total"], total["llamaserve_prefix_cache_queries_total"]


def hit_rate(url: str) -> tuple[float, int]:
    """Hit rate of the conversations' requests (counters before and after), and replicas used."""
    import time

    time.sleep(5)  # the replicas push their counters every 2 s
    hits0, queries0 = counters(url)
    bodies = []
    for q in range(4):
        for i in range(8):
            system = f"{i} " + " ".join(f"policy{i}-{k}" for k in range(80))
            bodies.append({"messages": [{"role": "system", "content": system},
                                        {"role": "user", "content": f"Question {q}: what is rule {q}?"}],
                           "max_tokens": 1, "temperature": 0})
    with httpx.Client(timeout=120) as client, ThreadPoolExecutor(2) as pool:
        replies = list(pool.map(lambda b: client.post(f"{url}/v1/chat/completions", json=b), bodies))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200]
    used = len({r.headers.get("x-llamaserve-replica") for r in replies})
    time.sleep(5)
    hits1, queries1 = counters(url)
    return (hits1 - hits0) / max(1.0, queries1 - queries0), used


def main() -> int:
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    commit = git.stdout.strip()
    rows = {}
    for name, flags in [("plain server", []), ("--replicas 1 (Ray Serve)", ["--replicas", "1"]),
                        ("--replicas 2 (Ray Serve)", ["--replicas", "2"])]:
        server = ServerProcess(FLAGS + flags)
        try:
            rows[name] = ttft(server.url)
            print(name, rows[name], file=sys.stderr)
            if name.startswith("--replicas 2"):
                on = hit_rate(server.url)
        finally:
            server.proc.terminate()
            server.proc.wait(120)
    server = ServerProcess(FLAGS + ["--replicas", "2", "--no-prefix-routing"])
    try:
        off = hit_rate(server.url)
    finally:
        server.proc.terminate()
        server.proc.wait(120)
    plain = rows["plain server"]
    lines = [MARK[0], "## Scaling out: Ray Serve's cost and prefix routing's gain (issue 16)", "",
             f"`.venv/bin/python benchmarks/replicas.py` at {commit}, on {cpu_description()} (2 cores), the "
             "embedded model, `" + " ".join(FLAGS) + "`; chat requests from `llamaserve bench`'s built-in "
             "prompts, 16 tokens each (ignore_eos), 32 a level. One run: compare within the table.", "",
             "| server | TTFT p50 c=1 | TTFT p99 c=1 | TTFT p50 c=8 | TTFT p99 c=8 | tokens/s c=8 | "
             "p50 TTFT vs plain (c=1 / c=8) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r[1][0]:.0f} ms | {r[1][1]:.0f} ms | {r[8][0]:.0f} ms | "
                     f"{r[8][1]:.0f} ms | {r[8][2]:.0f} | {r[1][0] - plain[1][0]:+.0f} ms / "
                     f"{r[8][0] - plain[8][0]:+.0f} ms |")
    lines += ["", "Prefix-cache hit rate (hits / looked-up prompt tokens, every replica's counters from the "
              "deployment's `/metrics`), 2 replicas, 8 conversations x 4 questions with ~200-token system "
              "prompts of their own, 2 clients:", "",
              "| routing | hit rate | replicas used |", "|---|---|---|",
              f"| prefix-aware (default) | {on[0]:.2f} | {on[1]} |",
              f"| `--no-prefix-routing` (power of two choices) | {off[0]:.2f} | {off[1]} |", MARK[1]]
    section = "\n".join(lines) + "\n"
    path = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
    text = path.read_text()
    if MARK[0] in text:
        text = text[:text.index(MARK[0])] + section + text[text.index(MARK[1]) + len(MARK[1]) + 1:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
