"""The `llamaserve` command: serve, generate, chat, info, bench."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid

from llamaserve.config import EngineConfig
from llamaserve.loader.errors import ModelLoadError
from llamaserve.loader.registry import DEFAULT_MODEL


def _engine_args(p: argparse.ArgumentParser) -> None:
    d = EngineConfig()
    p.add_argument("--model", default=None, help=f"GGUF file, HF folder, or {DEFAULT_MODEL!r} (default)")
    p.add_argument("--chat-template", default=None, metavar="FILE", help="Jinja chat template to use")
    p.add_argument("--dtype", default=d.dtype, help="auto | float32 | bfloat16 | float16")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda")
    p.add_argument("--quantization", default=d.quantization,
                   help="auto (default: GGUF weights stay in their own type on our CPU kernels; "
                        "safetensors and CUDA: bfloat16) | none (exact: every weight dequantized to "
                        "float32) | int4 (GGUF Q4_0/Q4_1 only) | int8 (every linear requantized to int8)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model at start-up: faster steps on CPU, but the first start "
                        "compiles for minutes (later starts reuse inductor's on-disk cache)")
    p.add_argument("--kv-cache-memory", type=_gb_or_auto, default="auto", metavar="GB|auto",
                   help="GB for the KV cache; auto (default): room for --max-num-seqs full contexts within "
                        "the memory that is free, less max(1 GiB, 10%% of it); at least one full context")
    p.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype,
                   choices=["auto", "float32", "bfloat16", "float16", "int8"],
                   help="what K/V are stored as; auto (default): float32 in the exact mode (--quantization "
                        "none), else bfloat16 (0.5 MiB a token for Llama 2 7B); int8 halves that")
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="cap on running sequences")
    p.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens,
                   help="per-step token budget (longer prompts are prefilled in chunks)")
    p.add_argument("--no-prefill-priority", dest="prefill_priority", action="store_false",
                   help="mix new prompts into the running sequences' steps instead of giving them a step "
                        "of their own first (steadier time per token, later first tokens under load)")
    p.add_argument("--max-model-len", type=int, default=d.max_model_len, help="context length (0: model's)")
    p.add_argument("--block-size", type=int, default=d.block_size, help="KV-cache block size in tokens")


def _gb_or_auto(value: str) -> float:
    if value == "auto":
        return 0.0
    try:
        gb = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size in GB or auto, got {value!r}") from None
    if not gb > 0:
        raise argparse.ArgumentTypeError(f"expected a size in GB > 0 or auto, got {value!r}")
    return gb


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        block_size=args.block_size, kv_cache_memory=args.kv_cache_memory, max_num_seqs=args.max_num_seqs,
        kv_cache_dtype=args.kv_cache_dtype,
        max_batch_tokens=args.max_batch_tokens, max_model_len=args.max_model_len, dtype=args.dtype,
        prefill_priority=args.prefill_priority, device=args.device, quantization=args.quantization,
        compile=args.compile,
    )


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (a trailing /v1 is fine)")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--model", default=None, help="model name to request (default: the server's first)")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, nargs="+", default=None, metavar="N",
                      help="closed loop: N requests in flight, one level each (default: 1 8 16)")
    load.add_argument("--request-rate", type=float, nargs="+", default=None, metavar="R",
                      help="open loop: Poisson arrivals at R requests/s, one level each (inf: all at once)")
    p.add_argument("--num-prompts", type=int, default=64, help="requests per level")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--ignore-eos", action="store_true", help="ask the server to generate all max-tokens")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--prompts-jsonl", default=None, metavar="FILE",
                   help='one JSON object a line with "prompt" or "messages" (default: 64 built-in prompts)')
    p.add_argument("--seed", type=int, default=0, help="prompt order and arrival times")
    p.add_argument("--ttft-slo-ms", type=float, default=None, help="goodput SLO on time to first token")
    p.add_argument("--tpot-slo-ms", type=float, default=None, help="goodput SLO on time per output token")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--label", default=None, help="name of this run in the JSON and plots")
    p.add_argument("--json-out", default=None, metavar="FILE", help="config, metrics and per-request records")
    p.add_argument("--plot-out", default=None, metavar="FILE.png", help="tokens/s and TTFT p50 per level")
    p.add_argument("--compare", nargs="+", default=None, metavar="JSON",
                   help="no load: print and plot (with --plot-out) these --json-out results together")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamaserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the OpenAI-compatible REST API")
    _engine_args(serve)
    from llamaserve.server.settings import add_server_args

    add_server_args(serve)
    from llamaserve.server.replicas import add_replica_args

    add_replica_args(serve)

    gen = sub.add_parser("generate", help="answer one query, streamed to stdout")
    gen.add_argument("query")
    _engine_args(gen)
    gen.add_argument("--system", default=None, help="system prompt")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)

    info = sub.add_parser("info", help="print a model's config, size and tensor types")
    info.add_argument("--model", default=None)

    bench = sub.add_parser("bench", help="load-test an OpenAI-compatible server: TTFT, ITL, TPOT, tokens/s")
    _bench_args(bench)
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    from llamaserve.engine.llm_engine import LLMEngine
    from llamaserve.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    start = time.perf_counter()
    engine = LLMEngine.from_model(args.model, engine_config(args), args.chat_template, progress=True)
    print(f"loaded {engine.source.path.name} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.query}
    ]
    prompt = engine.tokenizer.encode_chat(messages)
    engine.add_request(uuid.uuid4().hex, prompt, params)
    start, tokens = time.perf_counter(), 0
    while engine.has_unfinished:
        for out in engine.step():
            for c in out.outputs:
                sys.stdout.write(c.text)
            sys.stdout.flush()
            tokens = out.completion_tokens
    elapsed = time.perf_counter() - start
    print(f"\n[{tokens} tokens in {elapsed:.2f} s, {tokens / max(elapsed, 1e-9):.1f} tok/s]", file=sys.stderr)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from llamaserve.loader.weights import inspect_model

    src = inspect_model(args.model)
    cfg = src.config
    print(f"model: {src.path} ({src.kind})")
    for name in cfg.__dataclass_fields__:
        print(f"  {name}: {getattr(cfg, name)}")
    n = cfg.num_parameters
    print(f"parameters: {n:,} ({n / 1e9:.2f} B)")
    print("tensor types: " + ", ".join(f"{k} x{v}" for k, v in sorted(src.tensor_types.items())))
    print(f"memory: {n * 4 / 1e9:.2f} GB as float32, {n * 2 / 1e9:.2f} GB as bfloat16")
    from llamaserve.model import native

    print(f"CPU kernels: {native.info()}")
    import torch

    from llamaserve.engine.model_runner import auto_kv_blocks
    from llamaserve.model.kv_cache import KV_DTYPES, PagedKVCache
    from llamaserve.sysmem import GiB, free_memory, memory_margin

    ctx = cfg.max_position_embeddings
    per = {name: PagedKVCache.bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                                              dtype) for name, dtype in KV_DTYPES.items()}
    print("KV cache per token: " + ", ".join(f"{n} {b / 1024:.1f} KiB" for n, b in per.items())
          + f"; one full {ctx:,}-token context: " + ", ".join(f"{n} {b * ctx / GiB:.2f} GiB"
                                                              for n, b in per.items()))
    # What `serve` with the defaults would allocate now: bfloat16 K/V (float32 for --quantization none),
    # sized from the memory free once the weights (about the file's size; bfloat16 for safetensors) load.
    weights = src.path.stat().st_size if src.kind == "gguf" else n * 2
    free, total = free_memory(torch.device("cpu"))
    d = EngineConfig()
    blocks = auto_kv_blocks(free - weights, total, per["bfloat16"] * d.block_size, -(-ctx // d.block_size),
                            d.max_num_seqs)
    bs = d.block_size
    verdict = (f"{blocks * bs:,} tokens ({blocks * bs / ctx:.1f} full contexts)" if blocks else
               "not one full context: serve would refuse to start (see --max-model-len, --kv-cache-dtype "
               "int8, --kv-cache-memory)")
    print(f"KV cache with --kv-cache-memory auto here now: {verdict}; {free / GiB:.1f} GiB free, about "
          f"{weights / GiB:.1f} GiB of weights, {memory_margin(total) / GiB:.1f} GiB kept free")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from llamaserve.bench import report
    from llamaserve.bench.load import BenchConfig, BenchError, run_bench

    if args.compare:
        runs = [report.load_result(path) for path in args.compare]
        for label, metrics in runs:
            print(f"{label}\n{report.format_table(metrics)}\n")
        if args.plot_out:
            report.plot_results(runs, args.plot_out)
        return 0
    cfg = BenchConfig(
        base_url=args.base_url, api_key=args.api_key, model=args.model, endpoint=args.endpoint,
        concurrency=tuple(args.concurrency or ([] if args.request_rate else [1, 8, 16])),
        request_rates=tuple(args.request_rate or []), num_prompts=args.num_prompts,
        max_tokens=args.max_tokens, ignore_eos=args.ignore_eos, temperature=args.temperature,
        prompts_jsonl=args.prompts_jsonl, seed=args.seed, ttft_slo_ms=args.ttft_slo_ms,
        tpot_slo_ms=args.tpot_slo_ms, timeout=args.timeout, label=args.label,
    )
    try:
        run = asyncio.run(run_bench(cfg, log=lambda msg: print(msg, file=sys.stderr)))
    except BenchError as e:
        print(f"llamaserve: error: {e}", file=sys.stderr)
        return 1
    metrics = [report.summarize(level, cfg.ttft_slo_ms, cfg.tpot_slo_ms) for level in run.levels]
    print(f"{report.label_of(run)}: {run.model} at {run.url}, {cfg.num_prompts} requests a level, "
          f"max_tokens {cfg.max_tokens}{', ignore_eos' if cfg.ignore_eos else ''}")
    print(report.format_table(metrics))
    if errors := report.format_errors(metrics):
        print(f"failures:\n{errors}", file=sys.stderr)
    if args.json_out:
        report.write_json(args.json_out, report.result_dict(run, metrics))
    if args.plot_out:
        report.plot_results([(report.label_of(run), metrics)], args.plot_out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "info":
            return cmd_info(args)
        if args.command == "bench":
            return cmd_bench(args)
        from llamaserve.server.replicas import replica_plan

        plan = replica_plan(args)
        if plan is not None:
            from llamaserve.server.replicas import run

            return run(args, engine_config(args), plan)
        from llamaserve.server.serve import serve

        return serve(args, engine_config(args))
    except (ModelLoadError, ValueError) as e:
        print(f"llamaserve: error: {e}", file=sys.stderr)
        return 2
    except MemoryError as e:
        print(f"llamaserve: error: out of memory ({e or 'an allocation failed'}); try a smaller "
              "--kv-cache-memory or --max-model-len", file=sys.stderr)
        return 2
    except RuntimeError as e:  # torch reports a failed allocation as a RuntimeError
        if "can't allocate memory" not in str(e) and "out of memory" not in str(e).lower():
            raise
        print(f"llamaserve: error: out of memory ({str(e).splitlines()[0][:200]}); try a smaller "
              "--kv-cache-memory or --max-model-len", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
