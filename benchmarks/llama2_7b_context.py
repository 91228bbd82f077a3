"""Llama 2's full context on our defaults: a 7B GGUF served with no flags, against llama-server (issue 11).

    .venv/bin/python benchmarks/llama2_7b_context.py --model /tmp/q4km.gguf \
        --llama-server .bench/llama.cpp-amx/bin/llama-server

The file is the one benchmarks/llama2_7b.py writes (Llama 2 7B's shapes, llama.cpp's Q4_K_M recipe,
LLaMA's vocabulary; random weights, so greedy text is noise and never ends early: ignore_eos is not even
needed). Measured on our server, started with no flags but the model:

1. the pool it sized itself (/health) and RSS after load;
2. the OpenAI SDK's default chat request (no max_tokens: the rest of the 4,096-token context), streamed,
   closed after 16 tokens (at about 5 tokens/s the whole context would take 15 minutes);
3. a 3,596-token prompt with 500 generated tokens, then RSS with that full 4,096-token context held
   (nothing else has run but 2);
4. four concurrent conversations of 1,000 tokens (prompt + 32 generated), and the engine's preemptions;
5. decode tokens/s at 3,000 tokens of context (a 2,990-token prompt, the first 2,990 tokens of 3's, so
   served from the prefix cache; 128 tokens, timed after the first).

llama-server (`-c 4096 -t 2`, one slot, its f16 K/V) runs 5 on the same file, in the same run.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama2_7b_measure import llamaserve_cmd, memory_gb, start_server, stop_server  # noqa: E402

from llamaserve.model import native  # noqa: E402

FULL = 4096  # Llama 2's context: step 3's prompt plus its generated tokens fill it exactly
SENTENCE = "The old lighthouse keeper wrote in his journal every night about the ships and the sea. "


def prompt_of(tokens: int, count: Any, head: str = "") -> str:
    """A prose prompt of `tokens` tokens (± a sentence's worth, then trimmed by words) by `count`."""
    text = head
    while count(text + SENTENCE) <= tokens:
        text += SENTENCE
    words = SENTENCE.split()
    i = 0
    while count(text + words[i] + " ") <= tokens and i < len(words) - 1:
        text += words[i] + " "
        i += 1
    return text


def completion(client: Any, url: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """One streamed /v1/completions request: prompt tokens, tokens, TTFT and decode tokens/s."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start, first, last, chunks, usage = time.perf_counter(), 0.0, 0.0, 0, {}
    with client.stream("POST", f"{url}/v1/completions", json=body, timeout=3600) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"{r.status_code}: {r.text}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            if event.get("timings"):  # llama-server's own counts
                usage = {"prompt_tokens": event["timings"].get("prompt_n"),
                         "completion_tokens": event["timings"].get("predicted_n")} | usage
            if event.get("choices") and event["choices"][0].get("text"):
                last = time.perf_counter()
                first = first or last
                chunks += 1
    tokens = usage.get("completion_tokens") or chunks
    return {"prompt_tokens": usage.get("prompt_tokens"), "tokens": tokens,
            "ttft_s": round(first - start, 2), "seconds": round(last - start, 2),
            "decode_tok_s": round((tokens - 1) / (last - first), 3) if last > first else None}


def preemptions(client: Any, url: str) -> float:
    text = client.get(f"{url}/metrics").text
    m = re.search(r"^llamaserve_num_preemptions_total ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


def ours(args: argparse.Namespace, prompts: dict[str, Any], full_prompt_tokens: int) -> dict[str, Any]:
    import httpx
    import openai

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        proc, url = start_server(llamaserve_cmd(args.model), Path(tmp) / "ours.log")
        try:
            out["load_s"] = round(time.perf_counter() - start, 1)
            out["after_load"] = memory_gb(proc.pid)
            with httpx.Client(timeout=3600) as client:
                out["health"] = client.get(f"{url}/health").json()
                print(json.dumps(out), flush=True)
                # 2. the SDK's default chat request
                sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
                model = sdk.models.list().data[0].id
                stream = sdk.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": "Tell me about Llama 2."}],
                    stream=True)
                got = 0
                for chunk in stream:
                    got += bool(chunk.choices and chunk.choices[0].delta.content)
                    if got >= 16:
                        break
                stream.close()
                out["sdk_default_chat"] = {"ok": True, "chunks_read": got}
                print(json.dumps(out["sdk_default_chat"]), flush=True)
                # 3. a 3,596-token prompt, 500 tokens: RSS with one full 4,096-token context held
                full = completion(client, url, prompts["p_full"], FULL - full_prompt_tokens)
                full["context_tokens"] = (full["prompt_tokens"] or 0) + full["tokens"]
                out["full_context"] = full
                out["after_full_context"] = memory_gb(proc.pid)
                out["health_end"] = client.get(f"{url}/health").json()
                print(json.dumps(full), flush=True)
                if args.full_context_only:
                    return out
                # 4. four concurrent 1,000-token conversations
                from concurrent.futures import ThreadPoolExecutor

                before = preemptions(client, url)
                t0 = time.perf_counter()
                with ThreadPoolExecutor(4) as pool:
                    four = list(pool.map(lambda p: completion(client, url, p, 32), prompts["four"]))
                out["four_conversations"] = {
                    "each": four, "seconds": round(time.perf_counter() - t0, 1),
                    "preemptions": preemptions(client, url) - before,
                    "peak_rss_gb": memory_gb(proc.pid).get("peak_rss_gb")}
                print(json.dumps(out["four_conversations"]), flush=True)
                # 5. decode at 3,000 tokens of context (its prompt is 3's first 2,990 tokens: cached)
                out["decode_at_3000"] = completion(client, url, prompts["p3000"], 128)
                print(json.dumps(out["decode_at_3000"]), flush=True)
        finally:
            stop_server(proc)
    return out


def llama_server(args: argparse.Namespace, prompts: dict[str, str]) -> dict[str, Any]:
    import httpx

    cmd = [args.llama_server, "-m", str(args.model), "-c", "4096", "-np", "1", "-t", str(args.threads)]
    out: dict[str, Any] = {"command": " ".join(cmd)}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        proc, url = start_server(cmd, Path(tmp) / "llama-server.log")
        try:
            out["load_s"] = round(time.perf_counter() - start, 1)
            out["after_load"] = memory_gb(proc.pid)
            with httpx.Client(timeout=3600) as client:
                out["decode_at_3000"] = completion(client, url, prompts["p3000"], 128)
            out["after"] = memory_gb(proc.pid)
            print(json.dumps(out), flush=True)
        finally:
            stop_server(proc)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--llama-server", metavar="BIN")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json-out", type=Path, default=Path(".bench/llama2_7b_context.json"))
    ap.add_argument("--full-context-only", action="store_true", help="ours, steps 1 to 3 only")
    args = ap.parse_args()
    from llamaserve.loader.tokenizer import load_tokenizer

    tok = load_tokenizer(args.model)

    def count(text: str) -> int:
        return len(tok.encode(text))

    p3000 = prompt_of(2990, count)
    prompts = {
        "four": [prompt_of(968, count, head=f"Conversation {i}. ") for i in range(4)],
        "p3000": p3000,
        "p_full": prompt_of(FULL - 500, count, head=p3000),
    }
    print({k: [count(p) for p in v] if isinstance(v, list) else count(v) for k, v in prompts.items()},
          flush=True)
    result: dict[str, Any] = {"cpu": native.cpu_description(), "model": str(args.model),
                              "ours": ours(args, prompts, count(prompts["p_full"]))}
    if args.llama_server:
        result["llama_server"] = llama_server(args, prompts)
        a = result["ours"]["decode_at_3000"]["decode_tok_s"]
        b = result["llama_server"]["decode_at_3000"]["decode_tok_s"]
        result["decode_at_3000_ratio"] = round(a / b, 3)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
