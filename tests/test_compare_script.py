"""benchmarks/compare.py: its BENCHMARKS.md section (table, ratio) and the marker replacement."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamaserve.bench.report import LevelMetrics, Stats
from tests.benchmark_scripts import load_benchmark

compare = load_benchmark("compare")


def _level(concurrency: int, tps: float, ttft_p50: float, ttft_p99: float, failed: int = 0) -> LevelMetrics:
    ms = Stats(1.0, 1.0, 1.0)
    return LevelMetrics(concurrency=concurrency, request_rate=None, completed=4, failed=failed,
                        duration_s=1.0, output_tokens=int(tps), request_throughput=4.0, output_throughput=tps,
                        goodput=None, ttft_ms=Stats(ttft_p50, ttft_p50, ttft_p99), tpot_ms=ms, itl_ms=ms,
                        e2e_ms=ms, errors={})


def test_section_has_the_measured_numbers_and_ratio() -> None:
    ours = [_level(1, 50.0, 120.0, 300.0), _level(16, 400.0, 900.0, 2500.0, failed=1)]
    peer = [_level(1, 200.0, 40.0, 60.0), _level(16, 320.0, 400.0, 1200.0)]
    info = {"llama_cpp_commit": "0c1e57098bba", "llama_cpp_version": "0.5.0", "variant": "amx"}
    text = compare.section(ours, peer, ["cmd one", "cmd two"], info, smoke=False, commit="abc1234")
    assert "| 1 | 50.0 | 200.0 | 0.25x | 120 / 300 | 40 / 60 | 0, 0 |" in text
    assert "| 16 | 400.0 | 320.0 | 1.25x | 900 / 2,500 | 400 / 1,200 | 1, 0 |" in text
    assert "commit 0c1e5709" in text and "llamaserve abc1234" in text and "cmd two" in text
    assert "SMOKE" not in text
    assert "SMOKE" in compare.section(ours, peer, [], info, smoke=True, commit="abc1234")


def test_write_section_creates_replaces_and_keeps_other_content(tmp_path: Path) -> None:
    md = tmp_path / "BENCHMARKS.md"
    compare.write_section(md, "first\n")
    assert md.read_text() == f"# Benchmarks\n\n{compare.START}\nfirst\n{compare.END}\n"
    md.write_text("# Benchmarks\n\nintro\n\n" + md.read_text().split("\n\n", 1)[1] + "\n## Engine\n\nkept\n")
    compare.write_section(md, "second\n")
    compare.write_section(md, "third\n")
    text = md.read_text()
    assert text == f"# Benchmarks\n\nintro\n\n{compare.START}\nthird\n{compare.END}\n\n## Engine\n\nkept\n"


def test_write_section_appends_without_markers_and_refuses_a_broken_pair(tmp_path: Path) -> None:
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nold notes\n")
    compare.write_section(md, "new\n")
    assert md.read_text() == f"# Benchmarks\n\nold notes\n\n{compare.START}\nnew\n{compare.END}\n"
    md.write_text(f"{compare.END}\n{compare.START}\n")
    with pytest.raises(SystemExit):
        compare.write_section(md, "x\n")


def test_both_servers_get_the_same_load_and_the_optional_prompt_file(monkeypatch) -> None:
    monkeypatch.setattr("sys.argv", ["compare.py", "--concurrency", "1", "16"])
    plain = compare.load_args(compare.parse_args())
    assert plain == ["--concurrency", "1", "16", "--num-prompts", "32", "--max-tokens", "128", "--ignore-eos",
                     "--temperature", "0"]
    monkeypatch.setattr("sys.argv", ["compare.py", "--prompts-jsonl", "p.jsonl", "--endpoint", "completions"])
    args = compare.load_args(compare.parse_args())
    assert args[-4:] == ["--prompts-jsonl", "p.jsonl", "--endpoint", "completions"]


def test_levels_alternate_between_the_servers_and_both_are_stopped(monkeypatch, tmp_path: Path) -> None:
    """Default order: both servers up, each level loads ours then llama-server; the per-level reports are
    merged into one per server, in level order; both servers are stopped even when a bench fails."""
    import json

    calls: list[str] = []
    monkeypatch.setattr(compare, "start", lambda label, *a: calls.append(f"start {label}") or label)
    monkeypatch.setattr(compare, "stop", lambda proc: calls.append(f"stop {proc}"))

    def bench(label: str, port: int, bench_args: list[str], json_out: Path) -> list[str]:
        level = int(bench_args[bench_args.index("--concurrency") + 1])
        calls.append(f"bench {label} c={level}")
        report = {"label": label, "levels": [{"metrics": {"concurrency": level}, "requests": []}]}
        json_out.write_text(json.dumps(report))
        return []

    monkeypatch.setattr(compare, "bench", bench)
    monkeypatch.setattr("sys.argv", ["compare.py", "--concurrency", "1", "16"])
    args = compare.parse_args()
    sides = [("ours", ["serve"], 1), ("llama-server", ["llama-server"], 2)]
    (ours, peer), cmds = compare.run_interleaved(sides, args, tmp_path)
    assert calls == ["start ours", "start llama-server", "bench ours c=1", "bench llama-server c=1",
                     "bench ours c=16", "bench llama-server c=16", "stop ours", "stop llama-server"]
    for path, label in ((ours, "ours"), (peer, "llama-server")):
        merged = json.loads(path.read_text())
        assert merged["label"] == label
        assert [lv["metrics"]["concurrency"] for lv in merged["levels"]] == [1, 16]
    assert "--concurrency N" in " ".join(cmds[0])

    calls.clear()
    monkeypatch.setattr(compare, "bench", lambda *a: (_ for _ in ()).throw(RuntimeError("bench failed")))
    with pytest.raises(RuntimeError):
        compare.run_interleaved(sides, args, tmp_path)
    assert calls == ["start ours", "start llama-server", "stop ours", "stop llama-server"]


def test_the_section_says_how_the_servers_took_turns() -> None:
    ours, peer = [_level(1, 50.0, 1.0, 1.0)], [_level(1, 40.0, 1.0, 1.0)]
    both_up = compare.section(ours, peer, [], {}, smoke=False, commit="abc")
    assert "each level loaded ours, then llama-server" in both_up
    alone = compare.section(ours, peer, [], {}, smoke=False, commit="abc", sequential=True)
    assert "one after the other" in alone
