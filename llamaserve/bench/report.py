"""Benchmark metrics as vLLM's `bench serve` defines them, the results table, the JSON file and the plots."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llamaserve.bench.load import BenchRun, LevelRun


def percentile(values: Sequence[float], p: float) -> float | None:
    """The p-th percentile, interpolating linearly between closest ranks (numpy's default); None if empty."""
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {p}")
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def tpot(e2e: float, ttft: float, output_tokens: int) -> float | None:
    """Time per output token after the first: (E2E - TTFT) / (output tokens - 1); None under 2 tokens."""
    return (e2e - ttft) / (output_tokens - 1) if output_tokens > 1 else None


@dataclass(frozen=True, slots=True)
class Stats:
    """Milliseconds; None where there were no values."""

    mean: float | None
    p50: float | None
    p99: float | None

    @staticmethod
    def of_seconds(values: Sequence[float]) -> Stats:
        ms = [v * 1000 for v in values]
        return Stats(sum(ms) / len(ms) if ms else None, percentile(ms, 50), percentile(ms, 99))


@dataclass(frozen=True, slots=True)
class LevelMetrics:
    concurrency: int | None
    request_rate: float | None
    completed: int
    failed: int
    duration_s: float
    output_tokens: int  # of completed requests
    request_throughput: float  # completed requests / duration
    output_throughput: float  # output tokens / duration
    goodput: float | None  # requests meeting every SLO / duration; None without SLOs
    ttft_ms: Stats
    tpot_ms: Stats
    itl_ms: Stats  # every gap of every completed request, pooled
    e2e_ms: Stats
    errors: dict[str, int]  # failure message -> count

    @staticmethod
    def from_dict(d: dict[str, Any]) -> LevelMetrics:
        stats = {k: Stats(**d[k]) for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")}
        return LevelMetrics(**(d | stats))


def summarize(level: LevelRun, ttft_slo_ms: float | None = None,
              tpot_slo_ms: float | None = None) -> LevelMetrics:
    ok = [r for r in level.records if r.ok and r.ttft is not None and r.e2e is not None]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    e2es = [r.e2e for r in ok if r.e2e is not None]
    # TPOT per request; None for single-token answers, which (as in vLLM) meet any TPOT SLO
    tpots = [tpot(e, t, r.output_tokens) for r, e, t in zip(ok, e2es, ttfts, strict=True)]
    goodput = None
    if ttft_slo_ms is not None or tpot_slo_ms is not None:
        good = sum((ttft_slo_ms is None or t * 1000 <= ttft_slo_ms)
                   and (tpot_slo_ms is None or tp is None or tp * 1000 <= tpot_slo_ms)
                   for t, tp in zip(ttfts, tpots, strict=True))
        goodput = good / level.duration
    tokens = sum(r.output_tokens for r in ok)
    return LevelMetrics(
        concurrency=level.concurrency, request_rate=level.request_rate, completed=len(ok),
        failed=len(level.records) - len(ok), duration_s=level.duration, output_tokens=tokens,
        request_throughput=len(ok) / level.duration, output_throughput=tokens / level.duration,
        goodput=goodput, ttft_ms=Stats.of_seconds(ttfts),
        tpot_ms=Stats.of_seconds([tp for tp in tpots if tp is not None]),
        itl_ms=Stats.of_seconds([gap for r in ok for gap in r.itl]), e2e_ms=Stats.of_seconds(e2es),
        errors=dict(Counter(r.error or "" for r in level.records if not r.ok).most_common()),
    )


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}"


def _level_name(m: LevelMetrics) -> str:
    return f"c={m.concurrency}" if m.concurrency is not None else f"rate={m.request_rate:g}/s"


def format_table(metrics: Sequence[LevelMetrics]) -> str:
    """One row per level; latencies in ms as mean/p50/p99."""
    head = ["level", "ok", "failed", "out tok/s", "req/s", "goodput",
            "TTFT ms", "TPOT ms", "ITL ms", "E2E ms"]
    rows = [head]
    for m in metrics:
        rows.append([_level_name(m), str(m.completed), str(m.failed), _num(m.output_throughput),
                     f"{m.request_throughput:.2f}", "-" if m.goodput is None else f"{m.goodput:.2f}"]
                    + ["/".join(_num(x) for x in (s.mean, s.p50, s.p99))
                       for s in (m.ttft_ms, m.tpot_ms, m.itl_ms, m.e2e_ms)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_errors(metrics: Sequence[LevelMetrics]) -> str:
    """The failures by level and message, or "" if there were none."""
    return "\n".join(f"{_level_name(m)}: {n} x {msg}" for m in metrics for msg, n in m.errors.items())


def label_of(run: BenchRun) -> str:
    return run.config.label or run.url.split("//", 1)[-1].split("/", 1)[0]


def result_dict(run: BenchRun, metrics: Sequence[LevelMetrics]) -> dict[str, Any]:
    """The JSON report: config, per-level metrics and every request's raw record (seconds)."""
    return {
        "label": label_of(run), "model": run.model, "url": run.url, "started": run.started,
        "config": run.config.public_dict(),
        "levels": [{"metrics": asdict(m), "requests": [asdict(r) for r in level.records]}
                   for m, level in zip(metrics, run.levels, strict=True)],
    }


def write_json(path: str | Path, result: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(result, indent=1) + "\n")


def load_result(path: str | Path) -> tuple[str, list[LevelMetrics]]:
    """(label, per-level metrics) of a JSON report written by `llamaserve bench --json-out`."""
    try:
        d = json.loads(Path(path).read_text())
        return str(d["label"]), [LevelMetrics.from_dict(lv["metrics"]) for lv in d["levels"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a `llamaserve bench` JSON report ({type(e).__name__}: {e})") from None


def plot_results(runs: Sequence[tuple[str, Sequence[LevelMetrics]]], path: str | Path) -> None:
    """Two panels, output tokens/s and TTFT p50 against concurrency (or request rate), a line per label."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import NullLocator
    except ImportError:
        raise ValueError("--plot-out needs matplotlib: pip install matplotlib") from None
    closed = {m.concurrency is not None for _, ms in runs for m in ms}
    if len(closed) != 1:
        raise ValueError("cannot plot closed-loop (--concurrency) and Poisson (--request-rate) runs together")
    by_concurrency = closed.pop()
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas: PNG without pyplot or a display
    ax_tps, ax_ttft = fig.subplots(1, 2)
    ticks: set[float] = set()
    for label, ms in runs:
        xs = [float(m.concurrency if m.concurrency is not None else m.request_rate or 0.0) for m in ms]
        ticks.update(xs)
        ax_tps.plot(xs, [m.output_throughput for m in ms], marker="o", label=label)
        ax_ttft.plot(xs, [m.ttft_ms.p50 if m.ttft_ms.p50 is not None else math.nan for m in ms], marker="o",
                     label=label)
    for ax, title in ((ax_tps, "output tokens/s"), (ax_ttft, "TTFT p50 (ms)")):
        ax.set_title(title)
        ax.set_xlabel("concurrency" if by_concurrency else "request rate (req/s)")
        if by_concurrency:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(sorted(ticks), labels=[f"{x:g}" for x in sorted(ticks)])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, format="png", dpi=110)
