"""RSS of our server on a 7B GGUF before and after one 1,500-token prefill (its K/V plus what the heap keeps).

    .venv/bin/python benchmarks/rss_prefill.py --model /tmp/q4km.gguf [--mmap-threshold 4194304]

--mmap-threshold starts the server with glibc's MALLOC_MMAP_THRESHOLD_ set (large temporaries then go
straight back to the OS), for comparison with the default.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama2_7b_context import completion, prompt_of  # noqa: E402
from llama2_7b_measure import llamaserve_cmd, memory_gb, start_server, stop_server  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=1500)
    ap.add_argument("--mmap-threshold", default=None)
    args = ap.parse_args()
    import httpx

    from llamaserve.loader.tokenizer import load_tokenizer

    tok = load_tokenizer(args.model)
    prompt = prompt_of(args.tokens, lambda t: len(tok.encode(t)))
    if args.mmap_threshold:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = args.mmap_threshold
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(llamaserve_cmd(args.model), Path(tmp) / "server.log")
        try:
            before = memory_gb(proc.pid)["rss_gb"]
            with httpx.Client(timeout=3600) as client:
                r = completion(client, url, prompt, 2)
            after = memory_gb(proc.pid)["rss_gb"]
        finally:
            stop_server(proc)
    kv = (r["prompt_tokens"] + 2) * 524288 / 1e9  # Llama 2 7B, bfloat16 K/V
    print(f"RSS after load {before:.2f} GB, after a {r['prompt_tokens']}-token prefill {after:.2f} GB "
          f"(+{after - before:.2f}; its K/V {kv:.2f} GB); first token {r['ttft_s']} s")


if __name__ == "__main__":
    main()
