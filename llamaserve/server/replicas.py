"""`llamaserve serve --replicas N`: the same server as N engine replicas behind one endpoint, on Ray Serve.

Three pieces, all Ray Serve's own machinery (no router process or RPC of ours):
- `EngineReplica`: one per replica. It loads the model once and runs our whole FastAPI app in-process
  (routes, error shapes, API keys, limits: exactly the single-process server); `handle` plays one HTTP
  request through that app and yields its response messages, naming the replica in a header.
- `Ingress`: the HTTP endpoint (Ray Serve's proxy calls it with each request). It reads the body,
  computes the prompt's block digests (server/affinity.py) and forwards the request to an engine replica
  through a streaming handle whose router (server/prefix_router.py) prefers the replica holding that
  prefix. A replica that dies before answering is retried once elsewhere; one that dies mid-stream ends
  the stream with the API's in-band error. Queue full at the handle gives 429 with Retry-After.
- `run`: starts or joins Ray, deploys both, serves until SIGTERM, then drains every replica.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from llamaserve.config import EngineConfig
from llamaserve.server.settings import ServerSettings

log = logging.getLogger("llamaserve")
REPLICA_HEADER = "x-llamaserve-replica"
APP_NAME = "llamaserve"


@dataclass(frozen=True, slots=True)
class ReplicaPlan:
    """How many engine replicas, on which resources, and how requests reach them."""

    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas: Ray Serve autoscaling
    ray_address: str | None = None  # None: start (or join) a local Ray instance
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    prefix_routing: bool = True
    imbalance: int = 4  # queue-length gap beyond which affinity gives way to balance
    health_check_period_s: float = 5.0

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {self.replicas}")
        if self.autoscale is not None and not 1 <= self.autoscale[0] <= self.autoscale[1]:
            raise ValueError(f"--autoscale MIN:MAX needs 1 <= MIN <= MAX, got {self.autoscale}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("--num-cpus-per-replica and --num-gpus-per-replica must be >= 0")


def parse_autoscale(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(lo), int(hi)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX replicas, e.g. 1:4, got {text!r}") from None


def add_replica_args(p: argparse.ArgumentParser) -> None:
    d = ReplicaPlan()
    p.add_argument("--replicas", type=int, default=None,
                   help="serve through Ray Serve with this many engine replicas (needs llamaserve[ray])")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to join (default: start a local Ray instance, or join the one running)")
    p.add_argument("--num-cpus-per-replica", type=float, default=d.num_cpus, help="Ray CPUs per replica")
    p.add_argument("--num-gpus-per-replica", type=float, default=d.num_gpus, help="Ray GPUs per replica")
    p.add_argument("--autoscale", type=parse_autoscale, default=None, metavar="MIN:MAX",
                   help="Ray Serve autoscaling between MIN and MAX replicas on ongoing requests")
    p.add_argument("--no-prefix-routing", action="store_true",
                   help="route on queue length only (power of two choices), not on the prompt's prefix")


def replica_plan(args: argparse.Namespace) -> ReplicaPlan | None:
    """The plan when the command asks for Ray Serve (--replicas, --autoscale or --ray-address), else None."""
    if args.replicas is None and args.autoscale is None and args.ray_address is None:
        return None
    return ReplicaPlan(replicas=args.replicas or (args.autoscale[0] if args.autoscale else 1),
                       autoscale=args.autoscale, ray_address=args.ray_address,
                       num_cpus=args.num_cpus_per_replica, num_gpus=args.num_gpus_per_replica,
                       prefix_routing=not args.no_prefix_routing)


def _import_ray() -> Any:
    try:
        import ray
        from ray import serve  # noqa: F401
    except ImportError:
        raise ValueError("--replicas needs Ray Serve: pip install 'llamaserve[ray]'") from None
    return ray


# ---------- metrics of every replica ----------

BOARD = ("llamaserve-metrics", "llamaserve")  # the board's actor name and namespace
PUSH_PERIOD_S = 2.0  # how often a replica sends its metrics; older than 5 periods: a replica gone


class MetricsBoard:
    """A detached Ray actor holding each replica's latest Prometheus text, for the ingress's /metrics."""

    def __init__(self) -> None:
        self.texts: dict[str, tuple[float, str]] = {}

    def put(self, replica: str, text: str) -> None:
        self.texts[replica] = (time.monotonic(), text)

    def get(self, max_age: float) -> dict[str, str]:
        now = time.monotonic()
        self.texts = {r: v for r, v in self.texts.items() if now - v[0] <= max_age}
        return {r: text for r, (_, text) in self.texts.items()}


def metrics_board() -> Any:
    import ray

    return ray.remote(num_cpus=0)(MetricsBoard).options(
        name=BOARD[0], namespace=BOARD[1], lifetime="detached", get_if_exists=True).remote()


# ---------- the engine replica ----------

class EngineReplicaImpl:
    """One engine and our app, played request by request (wrapped by serve.deployment in `deployments`)."""

    def __init__(self, model: str | None, config: EngineConfig, settings: ServerSettings,
                 chat_template: str | None, model_name: str, num_threads: int) -> None:
        import torch
        from ray import serve

        from llamaserve.engine.async_engine import AsyncEngine
        from llamaserve.engine.llm_engine import LLMEngine
        from llamaserve.server.app import create_app

        if num_threads > 0:
            torch.set_num_threads(num_threads)
        self.replica = serve.get_replica_context().replica_id.unique_id
        engine = LLMEngine.from_model(model, config, chat_template)
        self.engine = AsyncEngine(engine)
        self.engine.start()
        self.app = create_app(self.engine, settings, model_name)
        self.step_timeout = settings.step_timeout
        self.stopped = threading.Event()
        threading.Thread(target=self._push_metrics, name="llamaserve-metrics", daemon=True).start()
        log.info("replica %s: model loaded", self.replica)

    def _push_metrics(self) -> None:
        from prometheus_client import generate_latest

        registry = self.app.state.llamaserve.metrics.registry
        board = None
        while not self.stopped.wait(PUSH_PERIOD_S):
            try:
                board = board or metrics_board()
                board.put.remote(self.replica, generate_latest(registry).decode())
            except Exception:  # the board restarting, Ray shutting down: the next period tries again
                board = None

    async def handle(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Run one HTTP request through the app; yield {"status", "headers"} first, then body chunks.

        Closing the generator (the client left, the ingress cancelled) is a disconnect for the app, so
        the engine aborts the request, as on a single server.
        """
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        gone = asyncio.Event()
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": request["body"], "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            await queue.put(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": request["method"], "scheme": "http", "path": request["path"],
                 "raw_path": request["path"].encode(), "query_string": request["query"].encode(),
                 "root_path": "", "headers": [(k.encode("latin-1"), v.encode("latin-1"))
                                              for k, v in request["headers"]],
                 "client": tuple(request["client"]) if request.get("client") else None,
                 "server": ("llamaserve", 80), "state": {}}
        task = asyncio.create_task(self.app(scope, receive, send))  # type: ignore[arg-type]
        try:
            while True:
                if queue.empty() and task.done():
                    if task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
                    return
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    continue
                message = getter.result()
                if message["type"] == "http.response.start":
                    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message["headers"]]
                    yield {"status": message["status"], "headers": headers + [(REPLICA_HEADER, self.replica)]}
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield {"body": message["body"]}
                    if not message.get("more_body"):
                        return
        finally:
            gone.set()
            try:
                await asyncio.wait_for(task, 10)
            except Exception:  # the app logged it; a stuck one is cancelled
                task.cancel()

    def check_health(self) -> None:
        """Ray Serve replaces a replica whose engine failed or whose step is stuck past --step-timeout
        (the single server's watchdog and supervisor restart, in Ray's terms)."""
        if self.engine.check_stuck(self.step_timeout):
            raise RuntimeError(f"engine failed: {self.engine.error}")

    def __del__(self) -> None:  # after Ray Serve's graceful drain: stop the engine thread
        if hasattr(self, "stopped"):
            self.stopped.set()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


# ---------- the ingress ----------

STREAM_ERRORS = {  # how each kind of stream says "this answer failed" in-band
    "text/event-stream": lambda m: (f"data: {json.dumps({'error': {'message': m, 'type': 'server_error'}})}"
                                    "\n\ndata: [DONE]\n\n").encode(),
    "application/x-ndjson": lambda m: (json.dumps({"error": m}) + "\n").encode(),
}


class IngressImpl:
    """The HTTP endpoint: digests the prompt, forwards to an engine replica, streams the answer back."""

    def __init__(self, engine: Any, model: str | None, chat_template: str | None, block_size: int,
                 max_queue: int, api_keys: tuple[str, ...] = (),
                 max_body_bytes: int = 4 * 1024 * 1024) -> None:
        from pathlib import Path

        from llamaserve.loader.registry import resolve_model
        from llamaserve.loader.tokenizer import load_tokenizer

        self.engine = engine.options(stream=True, method_name="handle")
        self.block_size = block_size
        self.prefix_routing = True  # set by reconfigure from the deployment's user_config
        self.max_queue = max_queue
        self.max_body_bytes = max_body_bytes
        from llamaserve.server.auth import GuardMiddleware

        self.guard = GuardMiddleware(None, api_keys, max_body_bytes)  # the replicas' key check, for /metrics
        self.tokenizer = load_tokenizer(resolve_model(model), Path(chat_template) if chat_template else None)
        self.in_flight = 0
        self.draining = False

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Ray Serve's user_config: changed in place, without restarting the ingress or the engines."""
        self.prefix_routing = bool(config.get("prefix_routing", True))

    def drain(self) -> int:
        """Refuse new requests from now on (503); the requests still in flight."""
        self.draining = True
        return self.in_flight

    def num_in_flight(self) -> int:
        return self.in_flight

    async def __call__(self, request: Any) -> Any:
        self.in_flight += 1
        try:
            response = await self._forward(request)
        except BaseException:
            self.in_flight -= 1
            raise
        if not hasattr(response, "body_iterator"):
            self.in_flight -= 1
            return response
        inner = response.body_iterator

        async def counted() -> AsyncIterator[bytes]:
            try:
                async for chunk in inner:
                    yield chunk
            finally:
                self.in_flight -= 1

        response.body_iterator = counted()
        return response

    async def _body(self, request: Any) -> bytes | None:
        """The body, or None once it passes max_body_bytes (by Content-Length or as it streams in)."""
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return None
        parts, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            parts.append(chunk)
        return b"".join(parts)

    async def _metrics(self, request: Any) -> Any:
        """Every live replica's metrics, each sample labelled with its replica (pushed every 2 s); the
        key check is the replicas' own (GuardMiddleware's)."""
        from prometheus_client import CONTENT_TYPE_LATEST
        from starlette.responses import JSONResponse, Response

        from llamaserve.server.metrics import with_replica_label
        from llamaserve.server.protocol import error_for_path

        if self.guard._key_index({"path": "/metrics", "headers": request.scope["headers"]}) is None:
            return JSONResponse(error_for_path("/metrics", 401, "missing or invalid API key",
                                               "authentication_error", None, "invalid_api_key"),
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})

        texts = await metrics_board().get.remote(5 * PUSH_PERIOD_S)
        return Response(with_replica_label(texts), media_type=CONTENT_TYPE_LATEST)

    async def _forward(self, request: Any) -> Any:
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError
        from starlette.responses import JSONResponse, Response, StreamingResponse

        from llamaserve.server.affinity import request_digests
        from llamaserve.server.protocol import error_for_path

        path = request.url.path
        body = await self._body(request)
        if body is None:  # past --max-body-bytes: refused here, before it is all read into memory
            from starlette.responses import JSONResponse

            from llamaserve.server.protocol import error_for_path

            return JSONResponse(error_for_path(path, 413, f"request body exceeds {self.max_body_bytes} bytes",
                                               "invalid_request_error", None, "request_too_large"),
                                status_code=413)
        headers = [(k, v) for k, v in request.headers.items()]
        if path == "/metrics" and request.method == "GET":
            return await self._metrics(request)
        digests: list[str] = []
        if self.prefix_routing and request.method == "POST":
            digests = await asyncio.to_thread(request_digests, body, dict(request.headers), self.tokenizer,
                                              self.block_size)
        call = {"method": request.method, "path": path, "query": request.url.query, "headers": headers,
                "body": body, "client": list(request.client) if request.client else None, "prefix": digests}

        def error(status: int, message: str, code: str, extra: dict[str, str] | None = None) -> Any:
            return JSONResponse(error_for_path(path, status, message, "server_error" if status >= 500 else
                                               "rate_limit_error", None, code), status_code=status,
                                headers=extra)

        if self.draining:
            return error(503, "the server is shutting down", "draining", {"Retry-After": "1"})
        for attempt in range(2):  # a replica that dies before answering: once more, elsewhere
            stream = self.engine.remote(call)
            try:
                start = await stream.__anext__()
                break
            except BackPressureError:
                return error(429, f"every replica is busy (more than {self.max_queue} requests queued at the "
                             "router); retry later", "queue_full", {"Retry-After": "1"})
            except RayActorError:
                if attempt:
                    return error(503, "the replica serving this request failed twice; retry",
                                 "replica_failed", {"Retry-After": "1"})
            except StopAsyncIteration:
                return error(502, "the replica gave no response", "replica_failed")
        media = dict(start["headers"]).get("content-type", "").split(";")[0]
        passthrough = {k: v for k, v in start["headers"] if k.lower() not in ("content-length",)}
        if media not in STREAM_ERRORS:  # a JSON answer: whole, or an error, never a cut body with a 200
            parts = []
            try:
                async for chunk in stream:
                    parts.append(chunk["body"])
            except RayActorError:
                return error(503, "the replica serving this request failed before it finished; retry",
                             "replica_failed", {"Retry-After": "1"})
            return Response(b"".join(parts), status_code=start["status"], headers=passthrough)

        async def body_chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in stream:
                    yield chunk["body"]
            except RayActorError:
                log.warning("replica died mid-stream on %s", path)
                if media in STREAM_ERRORS:
                    yield STREAM_ERRORS[media]("the replica serving this request failed mid-answer; retry")
            finally:
                stream.cancel()  # the client left (or we are done): the replica sees a disconnect

        return StreamingResponse(body_chunks(), status_code=start["status"], headers=passthrough,
                                 media_type=None)


# ---------- deploying ----------

def deployments(plan: ReplicaPlan, config: EngineConfig, settings: ServerSettings) -> tuple[Any, Any]:
    """The two Ray Serve deployments for this plan (not yet bound)."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    max_ongoing = config.max_num_seqs + settings.max_queue  # a replica's own bound: beyond it, its 429
    options: dict[str, Any] = {
        "max_ongoing_requests": max_ongoing,
        "max_queued_requests": max(1, settings.max_queue),  # waiting at the router for a free replica
        "ray_actor_options": {"num_cpus": plan.num_cpus, "num_gpus": plan.num_gpus},
        "health_check_period_s": plan.health_check_period_s,
        "graceful_shutdown_timeout_s": settings.drain_timeout,
        "graceful_shutdown_wait_loop_s": 0.5,
        "request_router_config": RequestRouterConfig(
            request_router_class="llamaserve.server.prefix_router:PrefixAffinityRouter",  # type: ignore[arg-type]
            request_router_kwargs={"imbalance": plan.imbalance}),
    }
    if plan.autoscale:
        options["autoscaling_config"] = {"min_replicas": plan.autoscale[0], "max_replicas": plan.autoscale[1],
                                         "target_ongoing_requests": max(1, config.max_num_seqs)}
    else:
        options["num_replicas"] = plan.replicas
    engine = serve.deployment(EngineReplicaImpl, name="EngineReplica", **options)
    ingress = serve.deployment(IngressImpl, name="Ingress", num_replicas=1, max_ongoing_requests=100_000,
                               ray_actor_options={"num_cpus": 0},
                               user_config={"prefix_routing": plan.prefix_routing},
                               graceful_shutdown_timeout_s=settings.drain_timeout + 5,
                               graceful_shutdown_wait_loop_s=0.5)
    return engine, ingress


def build_app(plan: ReplicaPlan, config: EngineConfig, settings: ServerSettings, model: str | None,
              chat_template: str | None, model_name: str) -> Any:
    engine, ingress = deployments(plan, config, settings)
    threads = max(1, int(plan.num_cpus)) if plan.num_cpus else 1
    bound = engine.bind(model, config, settings, chat_template, model_name, threads)
    return ingress.bind(bound, model, chat_template, config.block_size, settings.max_queue, settings.api_keys,
                        settings.max_body_bytes)


APP_ARGS = {"model", "chat_template", "replicas", "num_cpus_per_replica", "num_gpus_per_replica",
            "prefix_routing", "kv_cache_memory", "max_model_len", "max_num_seqs", "max_queue", "api_keys"}


def ray_app(args: dict[str, Any]) -> Any:
    """Ray Serve application builder, for KubeRay's serveConfigV2 or `serve run
    llamaserve.server.replicas:ray_app replicas=2`: the keys of APP_ARGS (strings are fine); API keys
    also from LLAMASERVE_API_KEYS. An unknown key is an error, not ignored."""
    from llamaserve.loader.registry import DEFAULT_MODEL

    plan, config, settings = app_settings(args)
    model = args.get("model")
    return build_app(plan, config, settings, model, args.get("chat_template"), model or DEFAULT_MODEL)


def app_settings(args: dict[str, Any]) -> tuple[ReplicaPlan, EngineConfig, ServerSettings]:
    """ray_app's args as the plan, engine config and server settings (absent keys: the CLI's defaults)."""
    unknown = set(args) - APP_ARGS
    if unknown:
        raise ValueError(f"unknown llamaserve app args {sorted(unknown)}; known: {sorted(APP_ARGS)}")
    d, e = ServerSettings(), EngineConfig()
    plan = ReplicaPlan(replicas=int(args.get("replicas", 1)),
                       num_cpus=float(args.get("num_cpus_per_replica", 1)),
                       num_gpus=float(args.get("num_gpus_per_replica", 0)),
                       prefix_routing=str(args.get("prefix_routing", "true")).lower() not in ("false", "0"))
    config = EngineConfig(kv_cache_memory=float(args.get("kv_cache_memory", e.kv_cache_memory)),
                          max_model_len=int(args.get("max_model_len", e.max_model_len)),
                          max_num_seqs=int(args.get("max_num_seqs", e.max_num_seqs)))
    given = args.get("api_keys", "")
    text = (",".join(given) if isinstance(given, list) else str(given)) + "," + \
        os.environ.get("LLAMASERVE_API_KEYS", "")
    keys = [k.strip() for k in text.split(",") if k.strip()]
    settings = ServerSettings(api_keys=tuple(keys), max_queue=int(args.get("max_queue", d.max_queue)))
    return plan, config, settings


def start(plan: ReplicaPlan, config: EngineConfig, settings: ServerSettings, model: str | None,
          chat_template: str | None, model_name: str) -> Any:
    """Start or join Ray, deploy, and return when every replica is healthy (serve.run waits)."""
    connect(plan)
    from ray import serve

    serve.start(http_options={"host": settings.host, "port": settings.port})
    app = build_app(plan, config, settings, model, chat_template, model_name)
    return serve.run(app, name=APP_NAME, route_prefix="/")


def connect(plan: ReplicaPlan) -> Any:
    """Join the Ray cluster at plan.ray_address, or start a local instance (once per process)."""
    ray = _import_ray()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init(address=plan.ray_address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    return ray


def run(args: argparse.Namespace, config: EngineConfig, plan: ReplicaPlan) -> int:
    """`llamaserve serve --replicas N`: serve until SIGTERM/SIGINT, then drain every replica and exit 0."""
    from llamaserve.loader.registry import DEFAULT_MODEL
    from llamaserve.server.settings import server_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = server_settings(args)
    ray = _import_ray()
    from ray import serve

    started = time.perf_counter()
    connect(plan)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs handlers of its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        start(plan, config, settings, args.model, args.chat_template, args.model or DEFAULT_MODEL)
    except RuntimeError as e:  # a replica that failed to load: Ray's message says why
        print(f"llamaserve: error: the deployment failed: {e}", file=sys.stderr)
        _shutdown(ray, serve)
        return 2
    log.info("%s replicas healthy in %.1f s; serving on http://%s:%d", plan.autoscale or plan.replicas,
             time.perf_counter() - started, settings.host, settings.port)
    stop.wait()
    drain(settings.drain_timeout)
    _shutdown(ray, serve)
    return 0


def drain(timeout: float) -> int:
    """Refuse new requests, wait up to `timeout` for those in flight; return how many were left."""
    from ray import serve

    ingress = serve.get_deployment_handle("Ingress", app_name=APP_NAME)
    left = ingress.drain.remote().result()
    log.info("draining: %d requests in flight, up to %.0f s", left, timeout)
    deadline = time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = ingress.num_in_flight.remote().result()
    log.info("drained (%d still running at the deadline); shutting down", left)
    return int(left)


def _shutdown(ray: Any, serve: Any) -> None:
    try:
        serve.shutdown()
        ray.kill(ray.get_actor(*BOARD))
    except ValueError:  # no board: nothing was deployed
        pass
    finally:
        ray.shutdown()
