"""Peer comparison: our server against llama.cpp's llama-server on the embedded GGUF, level by level.

Both servers are started and waited on until /health answers 200. Then each concurrency level loads our
server, then llama-server, with `llamaserve bench` (closed loop, streamed, greedy, ignore_eos): one server
works at a time (the machine has few cores) and the other sits idle, and the two measurements of a level
are minutes apart at most, not a whole run apart. (These shared machines run 20-40% slower in some
stretches than in others.) --sequential instead benchmarks one server alone at every level, then the
other. The two JSON reports are compared into a table and a plot, and a section between
`<!-- compare:start -->` and `<!-- compare:end -->` in the markdown file is replaced with the numbers
measured in this run.

Usage: .venv/bin/python benchmarks/compare.py [--serve-args "--quantization int4"] [--smoke]
Build llama-server first: benchmarks/build_llama_server.sh
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

from llamaserve.bench.report import LevelMetrics, load_result
from llamaserve.loader.registry import default_model_path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
START, END = "<!-- compare:start -->", "<!-- compare:end -->"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(proc: subprocess.Popen[bytes], url: str, timeout: float, log: Path) -> None:
    """Poll GET url until 200; fail if the process exits first or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"compare: the server exited with {proc.returncode} before it was healthy; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass  # not listening yet, or 503 while the model loads
        time.sleep(0.5)
    sys.exit(f"compare: {url} not healthy after {timeout:g} s; see {log}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 60 s; returns once the process is gone."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start(label: str, server_cmd: list[str], port: int, out_dir: Path,
          health_timeout: float) -> subprocess.Popen[bytes]:
    """Start a server and wait until it is healthy (stopped again if it never is)."""
    log = out_dir / f"{label}.server.log"
    print(f"compare: starting {label}: {shlex.join(server_cmd)}", flush=True)
    with log.open("wb") as f:
        proc = subprocess.Popen(server_cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}/health", health_timeout, log)
    except BaseException:
        stop(proc)
        raise
    print(f"compare: {label} healthy", flush=True)
    return proc


def bench(label: str, port: int, bench_args: list[str], json_out: Path) -> list[str]:
    """Load one server with `llamaserve bench`; returns the command."""
    cmd = [str(BIN / "llamaserve"), "bench", "--base-url", f"http://127.0.0.1:{port}", *bench_args,
           "--json-out", str(json_out), "--label", label]
    print(f"compare: {shlex.join(cmd)}", flush=True)
    json_out.unlink(missing_ok=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return cmd


def run_one(label: str, server_cmd: list[str], port: int, bench_args: list[str], out_dir: Path,
            health_timeout: float) -> tuple[Path, list[str]]:
    """Start one server, benchmark it, stop it. Returns the JSON report and the bench command."""
    proc = start(label, server_cmd, port, out_dir, health_timeout)
    try:
        json_out = out_dir / f"{label}.json"
        return json_out, bench(label, port, bench_args, json_out)
    finally:
        stop(proc)


def merge_levels(parts: list[Path], out: Path) -> None:
    """One JSON report from per-level reports of the same server (levels in the given order)."""
    reports = [json.loads(p.read_text()) for p in parts]
    merged = {**reports[0], "levels": [lv for r in reports for lv in r["levels"]]}
    out.write_text(json.dumps(merged, indent=1) + "\n")


def run_interleaved(sides: list[tuple[str, list[str], int]], args: argparse.Namespace, out_dir: Path,
                    ) -> tuple[list[Path], list[list[str]]]:
    """Start every server, then at each concurrency level benchmark them one after the other; stop them.
    Returns each server's merged JSON report and its bench command, the level written N."""
    procs: list[subprocess.Popen[bytes]] = []
    parts: list[list[Path]] = [[] for _ in sides]
    try:
        for label, cmd, port in sides:
            procs.append(start(label, cmd, port, out_dir, args.health_timeout))
        for level in args.concurrency:
            for i, (label, _, port) in enumerate(sides):
                parts[i].append(out_dir / f"{label}.c{level}.json")
                bench(label, port, load_args(args, [level]), parts[i][-1])
    finally:
        for proc in procs:
            stop(proc)
    outs, cmds = [], []
    for (label, _, port), files in zip(sides, parts, strict=True):
        outs.append(out_dir / f"{label}.json")
        merge_levels(files, outs[-1])
        per_level = load_args(args, [])
        per_level.insert(1, "N")  # (each level N in turn)
        cmds.append([str(BIN / "llamaserve"), "bench", "--base-url", f"http://127.0.0.1:{port}", *per_level,
                     "--json-out", str(out_dir / f"{label}.cN.json"), "--label", label])
    return outs, cmds


def build_info(llama_server: Path) -> dict[str, str]:
    """key=value lines that build_llama_server.sh wrote beside the binary's build folder."""
    path = llama_server.parent.parent / "build-info.txt"
    if not path.is_file():
        return {}
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def machine() -> str:
    """The CPU, what of AVX-512/VNNI/AMX it has, and the kernel variant our server picks on it (the
    machines of one kind differ: AVX2-only Zen 3 or AVX-512 Zen 4)."""
    from llamaserve.model import native

    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")),
                 "unknown CPU")
    flags = native.cpu_flags()
    has = [name for flag, name in (("avx512f", "AVX-512"), ("avx512_vnni", "VNNI"), ("avx_vnni", "AVX-VNNI"),
                                   ("amx_tile", "AMX")) if flag in flags]
    return (f"{model}, {os.cpu_count()} cores ({', '.join(has) or 'AVX2 only'}; "
            f"our kernels: {native.info()})")


def our_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return git("rev-parse", "--short", "HEAD") + (" with uncommitted changes" if dirty else "")


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def section(ours: list[LevelMetrics], peer: list[LevelMetrics], commands: list[str], info: dict[str, str],
            smoke: bool, commit: str, sequential: bool = False) -> str:
    """The markdown section, from the two runs' metrics only."""
    title = "## Peer comparison: llamaserve vs llama.cpp llama-server"
    if smoke:
        title += " (SMOKE RUN: too short to mean anything)"
    amx = info.get("ldtilecfg_in_binary", "?")
    amx_note = {"?": "AMX unknown", "0": "no AMX code in it"}.get(amx, f"AMX kernels in it ({amx} ldtilecfg)")
    nice = f", at nice {os.nice(0)}" if os.nice(0) else ""
    lines = [
        title, "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine()}. "
        f"llama.cpp {info.get('llama_cpp_version', '?')} at commit {info.get('llama_cpp_commit', '?')[:8]} "
        f"(from the llama-cpp-python {info.get('llama_cpp_python_sdist', '?')} sdist, "
        f"its {info.get('variant', '?')} build, {amx_note}); "
        f"torch {importlib.metadata.version('torch')}; llamaserve {commit}{nice}.",
        "Model: the embedded SmolLM2-135M-Instruct Q4_1 GGUF for both. "
        + ("The servers ran one after the other." if sequential else
           "Both servers were up; each level loaded ours, then llama-server (one at a time)."),
        "", "Commands (the first runs the rest):", "", "```", *commands, "```", "",
        "| concurrency | ours tok/s | llama-server tok/s | ours / llama-server | ours TTFT p50 / p99 ms "
        "| llama-server TTFT p50 / p99 ms | failed (ours, llama-server) |",
        "|---|---|---|---|---|---|---|",
    ]
    for a, b in zip(ours, peer, strict=True):
        ratio = f"{a.output_throughput / b.output_throughput:.2f}x" if b.output_throughput else "-"
        ttft = " | ".join(f"{_ms(m.ttft_ms.p50)} / {_ms(m.ttft_ms.p99)}" for m in (a, b))
        lines.append(f"| {a.concurrency} | {a.output_throughput:,.1f} | {b.output_throughput:,.1f} | {ratio} "
                     f"| {ttft} | {a.failed}, {b.failed} |")
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    """Replace the text between the markers; append the block if there are none; create a missing file."""
    block = f"{START}\n{text}{END}\n"
    old = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if (START in old) != (END in old) or old.find(START) > old.find(END):
        sys.exit(f"compare: {path} has a broken {START} ... {END} pair; fix it by hand")
    if START in old:
        head, rest = old.split(START, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        new = head + block + ("\n" + tail if tail else "")
    else:
        new = old.rstrip("\n") + "\n\n" + block
    path.write_text(new)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-server", type=Path, default=ROOT / ".bench/llama.cpp-amx/bin/llama-server")
    ap.add_argument("--serve-args", default="",
                    help="extra `llamaserve serve` options, e.g. '--quantization int4'")
    ap.add_argument("--llama-server-args", default="-t 2 -c 8192 -np 16", help="llama-server options")
    ap.add_argument("--concurrency", type=int, nargs="+", default=None, help="default 1 16 (smoke: 1)")
    ap.add_argument("--num-prompts", type=int, default=None, help="default 32 (smoke: 4)")
    ap.add_argument("--max-tokens", type=int, default=None, help="default 128 (smoke: 16)")
    ap.add_argument("--prompts-jsonl", type=Path, default=None,
                    help="prompts for `llamaserve bench` (default: its built-in set)")
    ap.add_argument("--endpoint", choices=["chat", "completions"], default=None,
                    help="`llamaserve bench --endpoint` (default: its own)")
    ap.add_argument("--smoke", action="store_true",
                    help="a short end-to-end check; writes under .bench/, never BENCHMARKS.md")
    ap.add_argument("--markdown", type=Path, default=None, help="default BENCHMARKS.md (smoke: .bench/)")
    ap.add_argument("--plot-out", type=Path, default=None,
                    help="default benchmarks/compare.png (smoke: .bench/)")
    ap.add_argument("--health-timeout", type=float, default=600.0, help="seconds for a server to load")
    ap.add_argument("--sequential", action="store_true",
                    help="one server alone at every level, then the other (default: level by level)")
    args = ap.parse_args()
    smoke = args.smoke
    args.concurrency = args.concurrency or ([1] if smoke else [1, 16])
    args.num_prompts = args.num_prompts or (4 if smoke else 32)
    args.max_tokens = args.max_tokens or (16 if smoke else 128)
    args.markdown = args.markdown or ROOT / (".bench/compare-smoke.md" if smoke else "BENCHMARKS.md")
    plot = ".bench/compare-smoke.png" if smoke else "benchmarks/compare.png"
    args.plot_out = args.plot_out or ROOT / plot
    return args


def load_args(args: argparse.Namespace, levels: list[int] | None = None) -> list[str]:
    """The `llamaserve bench` options both servers get: the same load for each (at `levels`, default all
    of --concurrency)."""
    out = ["--concurrency", *map(str, args.concurrency if levels is None else levels),
           "--num-prompts", str(args.num_prompts),
           "--max-tokens", str(args.max_tokens), "--ignore-eos", "--temperature", "0"]
    if args.prompts_jsonl is not None:
        out += ["--prompts-jsonl", str(args.prompts_jsonl)]
    if args.endpoint is not None:
        out += ["--endpoint", args.endpoint]
    return out


def main() -> None:
    args = parse_args()
    commit = our_commit()  # before this run writes BENCHMARKS.md and the plot
    if not args.llama_server.is_file():
        sys.exit(f"compare: no {args.llama_server}; run benchmarks/build_llama_server.sh first")
    out_dir = ROOT / ".bench"
    out_dir.mkdir(exist_ok=True)
    gguf = str(default_model_path())
    bench_args = load_args(args)
    suffix = "-smoke" if args.smoke else ""
    p1, p2 = free_port(), free_port()
    ours_cmd = [str(BIN / "llamaserve"), "serve", "--host", "127.0.0.1", "--port", str(p1),
                *shlex.split(args.serve_args)]
    peer_cmd = [str(args.llama_server), "-m", gguf, "--host", "127.0.0.1", "--port", str(p2),
                *shlex.split(args.llama_server_args)]
    if args.sequential:
        ours_json, ours_bench = run_one("ours" + suffix, ours_cmd, p1, bench_args, out_dir,
                                        args.health_timeout)
        peer_json, peer_bench = run_one("llama-server" + suffix, peer_cmd, p2, bench_args, out_dir,
                                        args.health_timeout)
    else:
        sides = [("ours" + suffix, ours_cmd, p1), ("llama-server" + suffix, peer_cmd, p2)]
        (ours_json, peer_json), (ours_bench, peer_bench) = run_interleaved(sides, args, out_dir)
    compare_cmd = [str(BIN / "llamaserve"), "bench", "--compare", str(ours_json), str(peer_json),
                   "--plot-out", str(args.plot_out)]
    subprocess.run(compare_cmd, check=True, cwd=ROOT)
    whole = [".venv/bin/python", "benchmarks/compare.py", *sys.argv[1:]]
    commands = [shlex.join(c).replace(str(ROOT) + "/", "") for c in
                (whole, ours_cmd, ours_bench, peer_cmd, peer_bench, compare_cmd)]
    (_, ours), (_, peer) = load_result(ours_json), load_result(peer_json)
    text = section(ours, peer, commands, build_info(args.llama_server), args.smoke, commit, args.sequential)
    write_section(args.markdown, text)
    print(f"\n{text}\ncompare: wrote {args.markdown} and {args.plot_out}")


if __name__ == "__main__":
    main()
