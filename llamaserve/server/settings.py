"""Server settings (host, port, keys, queue bounds), validated with ValueError."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    max_queue: int = 256  # waiting sequences (prompts x n) beyond this get 429
    max_body_bytes: int = 4 * 1024 * 1024
    drain_timeout: float = 30.0
    served_model_name: str = ""
    log_requests: bool = True
    max_prompts: int = 128  # prompts in one completions request
    allowed_hosts: tuple[str, ...] = ()  # Host header names accepted; () accepts any
    cors_origins: tuple[str, ...] = ()  # browser origins allowed cross-site; () sends no CORS headers
    step_timeout: float = 300.0  # an engine step running longer is a failure (exit 3)
    read_timeout: float = 30.0  # seconds a client has to send a whole request (headers and body)
    limit_concurrency: int = 1024  # open connections / running requests before 503
    embedding_pooling: str = "mean"  # "mean" | "last": how /v1/embeddings pools the hidden states
    ui: bool = True  # the web playground at / (its files under /ui/)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.drain_timeout < 0:
            raise ValueError(f"drain_timeout must be >= 0, got {self.drain_timeout}")
        if any(not k for k in self.api_keys):
            raise ValueError("API keys must be non-empty")
        if self.step_timeout <= 0:
            raise ValueError(f"step_timeout must be > 0, got {self.step_timeout}")
        if self.read_timeout <= 0:
            raise ValueError(f"read_timeout must be > 0, got {self.read_timeout}")
        if self.limit_concurrency < 1:
            raise ValueError(f"limit_concurrency must be >= 1, got {self.limit_concurrency}")
        if self.embedding_pooling not in ("mean", "last"):
            raise ValueError(f"embedding_pooling must be 'mean' or 'last', got {self.embedding_pooling!r}")
        if self.max_prompts < 1:
            raise ValueError(f"max_prompts must be >= 1, got {self.max_prompts}")


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def default_allowed_hosts(host: str) -> tuple[str, ...]:
    """Bound to loopback, only loopback names may appear in Host (no DNS rebinding); else any name."""
    return LOOPBACK_HOSTS if host in LOOPBACK_HOSTS or host.startswith("127.") else ()


def add_server_args(p: argparse.ArgumentParser) -> None:
    d = ServerSettings()
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--api-key", action="append", default=[], help="require this bearer key (repeatable)")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="waiting sequences before 429")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="larger bodies get 413")
    p.add_argument("--drain-timeout", type=float, default=d.drain_timeout,
                   help="seconds in-flight requests get to finish after SIGTERM")
    p.add_argument("--served-model-name", default="", help="model id in the API (default: the file name)")
    p.add_argument("--no-access-log", action="store_true", help="no per-request log lines")
    p.add_argument("--max-prompts", type=int, default=d.max_prompts,
                   help="prompts one completions request may hold")
    p.add_argument("--allowed-hosts", default=None,
                   help="comma-separated Host names to accept, '*' for any (default: loopback names when "
                        "bound to loopback, any otherwise)")
    p.add_argument("--step-timeout", type=float, default=d.step_timeout,
                   help="seconds one engine step may run before the engine counts as failed (exit 3)")
    p.add_argument("--read-timeout", type=float, default=d.read_timeout,
                   help="seconds a client has to send a whole request, headers and body (then closed)")
    p.add_argument("--limit-concurrency", type=int, default=d.limit_concurrency,
                   help="open connections (or running requests) beyond which requests get 503")
    p.add_argument("--embedding-pooling", choices=["mean", "last"], default=d.embedding_pooling,
                   help="how /v1/embeddings and /api/embed pool the final hidden states")
    p.add_argument("--no-ui", action="store_true", help="no web playground at / (GET / is then a 404)")
    p.add_argument("--cors-origins", default="",
                   help="comma-separated browser origins allowed cross-site ('*' for any); default none")


def server_settings(args: argparse.Namespace) -> ServerSettings:
    env_keys = [k for k in os.environ.get("LLAMASERVE_API_KEYS", "").split(",") if k.strip()]
    if args.allowed_hosts is None:
        hosts = default_allowed_hosts(args.host)
    else:
        hosts = () if args.allowed_hosts.strip() == "*" else _names(args.allowed_hosts)
    return ServerSettings(
        host=args.host, port=args.port, api_keys=tuple(args.api_key + [k.strip() for k in env_keys]),
        max_queue=args.max_queue, max_body_bytes=args.max_body_bytes, drain_timeout=args.drain_timeout,
        served_model_name=args.served_model_name, log_requests=not args.no_access_log,
        max_prompts=args.max_prompts, allowed_hosts=hosts, step_timeout=args.step_timeout,
        cors_origins=_names(args.cors_origins), read_timeout=args.read_timeout,
        limit_concurrency=args.limit_concurrency, embedding_pooling=args.embedding_pooling, ui=not args.no_ui,
    )


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())
