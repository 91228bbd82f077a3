"""Greedy parity on the embedded model: our engine (any --quantization) and llama-server vs transformers.

The reference is transformers in float32 on the same GGUF's dequantized weights. Each of 32 chat prompts
(the model's chat template) is decoded greedily for up to 48 tokens by all three; a prompt counts as
identical when a server's tokens equal the reference's up to the first end-of-sequence token. The mean
common prefix says how long they agree before the first divergence.

Usage: .venv/bin/python benchmarks/greedy_parity.py [--quantization auto none] [--llama-server BIN]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama2_7b_measure as m  # noqa: E402  (the sibling file: server start-up and ports)

from llamaserve.config import EngineConfig  # noqa: E402
from llamaserve.engine.llm_engine import LLMEngine  # noqa: E402
from llamaserve.engine.sampling_params import SamplingParams  # noqa: E402
from llamaserve.loader.registry import default_model_path  # noqa: E402
from llamaserve.model import native  # noqa: E402

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain recursion in one sentence.",
    "List three primary colours.", "What is 17 times 23?", "Translate 'good morning' into Spanish.",
    "Give me a name for a pet llama.", "Why is the sky blue?",
    "Write a Python function that reverses a string.",
    "What is the boiling point of water in Fahrenheit?", "Summarise Romeo and Juliet in two sentences.",
    "Who wrote 'Pride and Prejudice'?", "Suggest a healthy breakfast.", "How many legs does a spider have?",
    "What does HTTP stand for?", "Tell me a fun fact about octopuses.", "What is photosynthesis?",
    "Name the largest planet in our solar system.", "How do I make a cup of tea?", "What is a prime number?",
    "Describe a rainy day in three words.", "What is the speed of light?", "Give me a synonym for happy.",
    "What is the tallest mountain on Earth?", "How many continents are there?",
    "Write a limerick about a cat.",
    "What is the chemical symbol for gold?", "Explain what a CPU does.", "What year did World War II end?",
    "Recommend a book for a long flight.", "What is the square root of 144?", "Why do leaves change colour?",
]
MAX_TOKENS = 48


def until_eos(ids: list[int], eos: set[int]) -> list[int]:
    out = []
    for t in ids:
        if t in eos:
            break
        out.append(t)
    return out


def reference(path: Path, prompts: list[list[int]], eos: set[int]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    out = []
    with torch.no_grad():
        for ids in prompts:
            gen = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False, top_k=None,
                                 top_p=None, temperature=None)
            out.append(until_eos(gen[0, len(ids):].tolist(), eos))
    return out


def ours(path: Path, quantization: str, prompts: list[list[int]], eos: set[int]) -> list[list[int]]:
    engine = LLMEngine.from_model(str(path), EngineConfig(quantization=quantization))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    return [until_eos(o[0], eos) for o in engine.generate(prompts, params)]


def llama_server(binary: str, path: Path, prompts: list[list[int]], eos: set[int]) -> list[list[int]]:
    import httpx

    with tempfile.TemporaryDirectory() as tmp:
        proc, url = m.start_server([binary, "-m", str(path), "-c", "4096", "-np", "1", "-t", "2"],
                                   Path(tmp) / "llama-server.log")
        try:
            out = []
            for ids in prompts:
                body = {"prompt": ids, "n_predict": MAX_TOKENS, "temperature": 0.0, "top_k": 1,
                        "cache_prompt": False, "return_tokens": True}
                r = httpx.post(f"{url}/completion", json=body, timeout=600)
                r.raise_for_status()
                out.append(until_eos(r.json()["tokens"], eos))
            return out
        finally:
            m.stop_server(proc)


def score(runs: list[list[int]], ref: list[list[int]]) -> tuple[int, float]:
    """(prompts with identical tokens, mean common prefix in tokens)."""
    same, prefix = 0, 0
    for a, b in zip(runs, ref, strict=True):
        same += a == b
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        prefix += n
    return same, prefix / len(ref)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quantization", nargs="+", default=["auto", "none"])
    ap.add_argument("--llama-server", metavar="BIN", help="also decode with this llama-server binary")
    args = ap.parse_args()
    torch.set_num_threads(2)
    path = default_model_path()
    from llamaserve.loader.tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    eos = set(tok.eos_token_ids)
    start = time.perf_counter()
    ref = reference(path, prompts, eos)
    rows = [("transformers float32 (reference)", 32, float(sum(map(len, ref)) / len(ref)))]
    for q in args.quantization:
        rows.append((f"llamaserve --quantization {q}", *score(ours(path, q, prompts, eos), ref)))
    if args.llama_server:
        peer = llama_server(args.llama_server, path, prompts, eos)
        rows.append(("llama.cpp llama-server", *score(peer, ref)))
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    print(f"Greedy parity, embedded SmolLM2-135M-Instruct Q4_1, {len(prompts)} chat prompts, up to "
          f"{MAX_TOKENS} tokens; {cpu}, our kernels: {native.info()}; {time.perf_counter() - start:.0f} s\n")
    print("| decoder | prompts identical to the reference | mean common prefix (tokens) |")
    print("|---|---|---|")
    for name, same, prefix in rows:
        label = f"{same}/{len(prompts)}" if "reference" not in name else "-"
        print(f"| {name} | {label} | {prefix:.1f}{' (mean length)' if 'reference' in name else ''} |")
    print(json.dumps({n: [s, p] for n, s, p in rows}))


if __name__ == "__main__":
    main()
