"""Structured output's cost: 16 concurrent chat streams on the embedded model, json_schema vs free text.

    .venv/bin/python benchmarks/structured_output.py [--streams 16] [--rounds 6] [--max-tokens 256]

One server (uvicorn in this process, the engine's defaults as `make serve` has them), the same prompts
both ways, alternating free text and json_schema rounds so that drift on a noisy machine hits both.
Over HTTP: completion tokens over each round's wall time (this includes prefill and the tail as streams
finish; the JSON answers are shorter, about 110 tokens to free text's 205, so this mixes in other
differences), and the rate while all streams decode (chunks between the last stream's first token and
the first stream's end: a short window for JSON, so noisy). Offline, the cleanest figure: the same 16
prompts generating exactly 96 tokens each, free text with EOS ignored vs a schema whose one string is
longer than that, so both runs have the same batch shapes and context lengths. Also the schemas'
compile times (first use, then cached), one step's mask cost, and that every JSON output validates.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import threading
import time
from typing import Any

import jsonschema
import uvicorn
from openai import AsyncOpenAI

from llamaserve.config import EngineConfig
from llamaserve.engine.async_engine import AsyncEngine
from llamaserve.engine.llm_engine import LLMEngine
from llamaserve.engine.sampling_params import StructuredOutput
from llamaserve.model.native import cpu_description
from llamaserve.server.app import create_app
from llamaserve.server.settings import ServerSettings

MODEL = "smollm2-135m-instruct"
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 40},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "minItems": 1,
                    "maxItems": 4},
        "employed": {"type": "boolean"},
        "pets": {"type": "array", "maxItems": 3, "items": {
            "type": "object", "properties": {"kind": {"enum": ["cat", "dog", "fish", "bird"]},
                                             "name": {"type": "string", "maxLength": 20}},
            "required": ["kind", "name"], "additionalProperties": False}},
        "bio": {"type": "string", "maxLength": 300},
    },
    "required": ["name", "age", "city", "hobbies", "employed", "pets", "bio"],
    "additionalProperties": False,
}
TOPICS = ["a baker in Lyon", "a retired pilot", "a student of physics", "a gardener", "a chess player",
          "a nurse in Oslo", "a painter", "a software engineer", "a fisherman", "a violin teacher",
          "a marathon runner", "a librarian", "a chef in Rome", "a farmer", "a journalist", "a carpenter"]


Round = tuple[float, int, int, float, int]  # seconds, tokens, valid outputs, steady seconds, steady chunks


async def _round(client: AsyncOpenAI, streams: int, max_tokens: int, structured: bool) -> Round:
    """One round of `streams` concurrent streamed chats."""
    extra: dict[str, Any] = {}
    if structured:
        extra["response_format"] = {"type": "json_schema",
                                    "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}

    async def one(i: int) -> tuple[int, bool, list[float]]:
        text, tokens, times = "", 0, []
        prompt = f"Describe {TOPICS[i % len(TOPICS)]} as a person: name, age, city, hobbies, pets, a bio."
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
            temperature=0.7, seed=i, stream=True, stream_options={"include_usage": True}, **extra)
        async for chunk in stream:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            for c in chunk.choices:
                text += c.delta.content or ""
                if c.delta.content:
                    times.append(time.perf_counter())
        valid = False
        if structured:
            try:
                jsonschema.validate(json.loads(text), SCHEMA)
                valid = True
            except (json.JSONDecodeError, jsonschema.ValidationError):
                valid = False
        return tokens, valid, times

    start = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(streams)))
    seconds = time.perf_counter() - start
    lo, hi = max(r[2][0] for r in results), min(r[2][-1] for r in results)
    steady = sum(lo < t <= hi for r in results for t in r[2])
    return seconds, sum(r[0] for r in results), sum(r[1] for r in results), max(hi - lo, 0.0), steady


def _compile_times(engine: LLMEngine) -> list[tuple[str, float, float]]:
    specs = {"person schema (above)": json.dumps(SCHEMA), "json_object": '{"type": "object"}',
             "100-property object": json.dumps({"type": "object", "properties": {
                 f"field_{i}": {"type": ["string", "integer", "boolean"]} for i in range(100)},
                 "required": [f"field_{i}" for i in range(100)]})}
    engine.grammars.tokenizer  # noqa: B018  (built once per engine: timed separately)
    out = []
    for name, value in specs.items():
        spec = StructuredOutput("json", value)
        start = time.perf_counter()
        engine.grammars.compile(spec)
        first = time.perf_counter() - start
        start = time.perf_counter()
        engine.grammars.compile(spec)
        out.append((name, first, time.perf_counter() - start))
    return out


def _mask_cost(engine: LLMEngine, rows: int) -> float:
    """Seconds for one step's grammar masks over `rows` sequences, each inside a JSON string value."""
    import torch

    grammar = engine.grammars.compile(StructuredOutput("json", json.dumps(SCHEMA)))
    states = [(i, grammar.start()) for i in range(rows)]
    for _, state in states:
        for token in engine.tokenizer.encode('{"name":"Bo', add_special_tokens=False):
            state.accept(token)
    logits = torch.randn(rows, engine.model_config.vocab_size)
    engine.grammars.apply_masks(logits, states)
    start = time.perf_counter()
    for _ in range(100):
        engine.grammars.apply_masks(logits, states)
    return (time.perf_counter() - start) / 100


def _engine_steps(engine: LLMEngine, streams: int, tokens: int, repeats: int) -> dict[bool, list[float]]:
    """Seconds for `streams` same-length prompts to generate exactly `tokens` tokens each, offline, free
    text (EOS ignored) vs a JSON schema whose one string must be longer than that: the same batch
    shapes and context lengths both ways, so the difference is what structured output costs per step."""
    from llamaserve.engine.sampling_params import SamplingParams

    schema = {"type": "object", "properties": {"story": {"type": "string", "minLength": 8 * tokens}},
              "required": ["story"]}
    prompts = [engine.tokenizer.encode_chat([{"role": "user", "content": f"Tell a story about {t}."}])
               for t in TOPICS[:streams]]
    width = min(len(p) for p in prompts)
    prompts = [p[-width:] for p in prompts]
    free = SamplingParams(max_tokens=tokens, temperature=0.7, seed=1, ignore_eos=True)
    constrained = SamplingParams(max_tokens=tokens, temperature=0.7, seed=1,
                                 structured=StructuredOutput("json", json.dumps(schema)))
    out: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeats):
        for structured, params in ((False, free), (True, constrained)):
            start = time.perf_counter()
            results = engine.generate(prompts, params)
            out[structured].append(time.perf_counter() - start)
            if any(len(r[0]) != tokens for r in results):
                raise RuntimeError("every stream must run the full length")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=256)
    args = ap.parse_args()
    engine = LLMEngine.from_model(None, EngineConfig(max_num_seqs=max(16, args.streams)))
    start = time.perf_counter()
    engine.grammars.tokenizer  # noqa: B018
    tokenizer_s = time.perf_counter() - start
    compile_rows = _compile_times(engine)
    mask_s = _mask_cost(engine, args.streams)
    offline = _engine_steps(engine, args.streams, 96, 6)
    async_engine = AsyncEngine(engine)
    async_engine.start()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(async_engine, ServerSettings(), MODEL),
                                           log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)

    async def run() -> dict[bool, list[Round]]:
        client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                             timeout=600)
        await _round(client, args.streams, 16, False)  # warm-up
        results: dict[bool, list[Round]] = {False: [], True: []}
        for _ in range(args.rounds):
            for structured in (False, True):
                results[structured].append(await _round(client, args.streams, args.max_tokens, structured))
        return results

    results = asyncio.run(run())
    server.should_exit = True
    async_engine.shutdown()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    print(f"CPU: {cpu_description()}; commit {commit.strip()}; {args.streams} streams, max_tokens "
          f"{args.max_tokens}, {args.rounds} rounds each, alternating")
    rate, steady = {}, {}
    for structured, rows in results.items():
        seconds, tokens = sum(r[0] for r in rows), sum(r[1] for r in rows)
        rate[structured] = tokens / seconds
        steady[structured] = sum(r[4] for r in rows) / max(1e-9, sum(r[3] for r in rows))
        runs = args.streams * args.rounds
        valid = f", {sum(r[2] for r in rows)}/{runs} outputs valid" if structured else ""
        print(f"{'json_schema' if structured else 'free text':11}: {tokens} tokens in {seconds:.1f} s = "
              f"{rate[structured]:.1f} tokens/s; all {args.streams} decoding: {steady[structured]:.1f} "
              f"tokens/s{valid}")
    print(f"json_schema / free text: {rate[True] / rate[False]:.2f}x over the rounds, "
          f"{steady[True] / steady[False]:.2f}x while all streams decode")
    pairs = sorted((j[1] / j[0]) / (f[1] / f[0]) for f, j in zip(results[False], results[True], strict=True))
    print(f"per adjacent pair of rounds, json/free tokens/s: {', '.join(f'{x:.2f}' for x in pairs)}; median "
          f"{statistics.median(pairs):.2f}x")
    for name, pick in (("fastest", min), ("median", statistics.median)):  # noise only ever adds time
        free_s, json_s = pick(offline[False]), pick(offline[True])
        print(f"offline engine, {args.streams} streams x 96 tokens, same shapes ({name} of 6, alternating): "
              f"free text {free_s:.2f} s, json_schema {json_s:.2f} s: json/free throughput "
              f"{free_s / json_s:.2f}x")
    print(f"grammar masks of one step for {args.streams} sequences: {mask_s * 1000:.2f} ms (a free-text step "
          f"of {args.streams} here: {args.streams / steady[False] * 1000:.0f} ms)")
    print(f"grammar tokenizer (once per engine): {tokenizer_s * 1000:.0f} ms")
    for name, first, again in compile_rows:
        print(f"compile {name}: {first * 1000:.1f} ms first, {again * 1000:.3f} ms cached")


if __name__ == "__main__":
    main()
