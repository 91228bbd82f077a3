"""Load time, memory and tok/s of our server, or of llama-server, on one GGUF file (used by llama2_7b.py).

Both are measured the same way: greedy, ignore_eos, max_tokens each; one stream, then N streams at once.
tok/s counts from submission to the last token (prefill included); decode tok/s from the moment every stream
has its first token. Memory is the process's peak (VmHWM) and current RSS, split into anonymous memory and
file-backed pages (weights read through a memory map count there, and the kernel may drop them).
"""

from __future__ import annotations

import contextlib
import json
import socket
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

TOPICS = (
    "the ocean, a robot, autumn, a lighthouse, mountains, a city at night, coffee, the moon, a library, "
    "trains, a garden, winter, music, a desert, friendship, rain"
).split(", ")


def prompt_texts(streams: int) -> list[str]:
    return [f"Write a story about {TOPICS[i % len(TOPICS)]}." for i in range(streams)]


# -- measurements ------------------------------------------------------------------------------------
def memory_gb(pid: int | str = "self") -> dict[str, float]:
    """Peak (VmHWM) and current resident memory, anonymous and file-backed (mmap'd weights), in GB."""
    status = Path(f"/proc/{pid}/status")
    if status.is_file():
        fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        keys = {"VmHWM": "peak_rss_gb", "VmRSS": "rss_gb", "RssAnon": "rss_anon_gb", "RssFile": "rss_file_gb"}
        return {ours: int(fields[k].split()[0]) / 1e6 for k, ours in keys.items()}
    import psutil  # not Linux: current RSS only

    return {"rss_gb": psutil.Process(None if pid == "self" else int(pid)).memory_info().rss / 1e9}


def rates(start: float, firsts: list[float], ends: list[float], tokens: int) -> dict[str, float]:
    """tok/s from submission to the last token, and decode tok/s once every stream has its first token."""
    end, all_started = max(ends), max(firsts)
    decode = (tokens - len(firsts)) / (end - all_started) if end > all_started else float("nan")
    return {
        "tok_s": round(tokens / (end - start), 2),
        "decode_tok_s": round(decode, 2),
        "ttft_s": round(max(firsts) - start, 3),
        "tokens": tokens,
    }


# -- llama-server (the reference), over its OpenAI endpoint -------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cmd: list[str], log: Path) -> Any:
    """Start a server (its command line without the port) and wait until /health answers 200."""
    import httpx

    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen([*cmd, "--host", "127.0.0.1", "--port", str(port)], stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{cmd[0]} did not become healthy in 900 s:\n{log.read_text()[-3000:]}")


def llama_server_cmd(binary: str, path: Path, threads: int, streams: int) -> list[str]:
    return [binary, "-m", str(path), "-c", "4096", "-np", str(streams), "-t", str(threads)]


def llamaserve_cmd(path: Path) -> list[str]:
    """Ours as a user starts it: no flags but the model (the defaults are what is measured)."""
    return [str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "llamaserve"), "serve",
            "--model", str(path), "--no-access-log"]


def stream_completion(client: Any, url: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(first token time, last token time, tokens) of one streamed /v1/completions request."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    first, last, chunks, counted = 0.0, 0.0, 0, None
    with client.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            # A chunk's text can be empty (an unfinished UTF-8 character): prefer the server's own count.
            if event.get("usage"):
                counted = event["usage"]["completion_tokens"]
            elif event.get("timings", {}).get("predicted_n"):
                counted = event["timings"]["predicted_n"]
            if event.get("choices") and event["choices"][0].get("text"):
                last = time.perf_counter()
                first = first or last
                chunks += 1
    if not chunks:
        raise RuntimeError(f"llama-server streamed no text for {prompt!r}")
    return first, last, counted or chunks


def server_run(client: Any, url: str, prompts: list[str], max_tokens: int) -> dict[str, float]:
    """All prompts at once, one thread each (llama-server's -np slots decode them as one batch)."""
    start = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        done = list(pool.map(lambda p: stream_completion(client, url, p, max_tokens), prompts))
    return rates(start, [d[0] for d in done], [d[1] for d in done], sum(d[2] for d in done))


def long_prompt(tokens: int, count: Any) -> str:
    """A prose prompt of about `tokens` tokens, as `count` (text -> token count) measures it."""
    sentence = "The old lighthouse keeper wrote in his journal every night about the ships and the sea. "
    text = sentence
    while count(text + sentence) <= tokens:
        text += sentence
    return text


def stop_server(proc: Any, timeout: float = 60) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def measure_server(label: str, cmd: list[str], streams: int, max_tokens: int,
                   ttft_prompt: str | None) -> dict[str, Any]:
    """A server as a child process (whose memory counts), over its OpenAI /v1/completions stream; its
    load time is start to a healthy /health. With ttft_prompt, the time to the first token of that
    prompt alone (median of 3) is measured too."""
    import httpx

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        proc, url = start_server(cmd, Path(tmp) / "server.log")
        try:
            result: dict[str, Any] = {
                "engine": label,
                "load_s": round(time.perf_counter() - start, 2),
                "after_load": memory_gb(proc.pid),
            }
            prompts = prompt_texts(streams)
            with httpx.Client(limits=httpx.Limits(max_connections=2 * streams)) as client:
                server_run(client, url, prompts[:1], 2)  # warm-up
                result["one_stream"] = server_run(client, url, prompts[:1], max_tokens)
                result[f"{streams}_streams"] = server_run(client, url, prompts, max_tokens)
                if ttft_prompt is not None:  # a new prompt each time: no prefix cache can help
                    runs = [server_run(client, url, [f"{i}. {ttft_prompt}"], 2) for i in range(3)]
                    ttfts = sorted(r["ttft_s"] for r in runs)
                    result["long_prompt_ttft_s"] = ttfts[1]
            result["after_generate"] = memory_gb(proc.pid)
        finally:
            stop_server(proc)
    return result


def alternate(cmds: dict[str, list[str]], streams: int, max_tokens: int, rounds: int) -> dict[str, Any]:
    """Every server up at once, then `rounds` rounds in which each in turn decodes one stream and then
    `streams` streams, the order reversed every other round: a slow stretch of the machine (these VMs
    swing 20-40% between minutes) falls on both, where one server after the other can catch either
    alone. Per label and round the decode tok/s ({'one': [...], 'many': [...]})."""
    import httpx

    labels = list(cmds)
    out: dict[str, Any] = {label: {"one": [], "many": []} for label in labels}
    prompts = prompt_texts(streams)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        urls = {}
        for i, (label, cmd) in enumerate(cmds.items()):
            proc, urls[label] = start_server(cmd, Path(tmp) / f"server{i}.log")
            stack.callback(stop_server, proc)
        for r in range(-1, rounds):  # round -1: a warm-up
            for label in labels if r % 2 == 0 else labels[::-1]:
                # A client per turn: a connection left idle while the other server ran may have been
                # closed by this one (uvicorn drops idle keep-alive connections after 5 s), and httpx
                # does not retry a POST on a connection that closed as it was reused.
                with httpx.Client(limits=httpx.Limits(max_connections=2 * streams)) as client:
                    if r < 0:
                        server_run(client, urls[label], prompts[:1], 2)
                        continue
                    for key, batch in (("one", prompts[:1]), ("many", prompts)):
                        run = server_run(client, urls[label], batch, max_tokens)
                        out[label][key].append(run["decode_tok_s"])
    return out


def alternate_table(out: dict[str, Any], streams: int) -> str:
    """Markdown: each round's decode tok/s and the first label's over the second's, then the medians."""
    a, b = list(out)[:2]
    lines = [f"| round | {a}, 1 stream | {b}, 1 stream | ratio | {a}, {streams} streams "
             f"| {b}, {streams} streams | ratio |", "|---|---|---|---|---|---|---|"]
    ratios: dict[str, list[float]] = {"one": [], "many": []}
    for r in range(len(out[a]["one"])):
        cells = []
        for key in ("one", "many"):
            x, y = out[a][key][r], out[b][key][r]
            ratios[key].append(x / y)
            cells.append(f"{x} | {y} | {x / y:.2f}x")
        lines.append(f"| {r + 1} | {' | '.join(cells)} |")
    med = [f"{statistics.median(out[a][k]):.2f} | {statistics.median(out[b][k]):.2f} | "
           f"**{statistics.median(ratios[k]):.2f}x**" for k in ("one", "many")]
    lines.append(f"| median (ratio: of the rounds' ratios) | {' | '.join(med)} |")
    return "\n".join(lines)


# -- report ------------------------------------------------------------------------------------------
HEADER = (
    "| engine | file | load s | RSS after load GB (anon + file) | peak RSS GB | 1 stream tok/s (decode) "
    "| {n} streams tok/s (decode) | long prompt TTFT s |\n|---|---|---|---|---|---|---|---|"
)


def table_row(r: dict[str, Any], file_label: str, streams: int) -> str:
    load, end = r["after_load"], r["after_generate"]
    mem = f"{load['rss_gb']:.2f}"
    if "rss_anon_gb" in load:
        mem += f" ({load['rss_anon_gb']:.2f} + {load['rss_file_gb']:.2f})"
    peak = end.get("peak_rss_gb", end["rss_gb"])
    one, many = r["one_stream"], r[f"{streams}_streams"]
    return (
        f"| {r['engine']} | {file_label} | {r['load_s']} | {mem} | {peak:.2f} "
        f"| {one['tok_s']} ({one['decode_tok_s']}) | {many['tok_s']} ({many['decode_tok_s']}) "
        f"| {r.get('long_prompt_ttft_s', '-')} |"
    )
