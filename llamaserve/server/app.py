"""create_app(engine, settings): the FastAPI application, with no module-level state."""

from __future__ import annotations

import json
import logging
import math
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from llamaserve.engine.async_engine import AsyncEngine, EngineDeadError, EngineStats
from llamaserve.server import routes
from llamaserve.server.auth import BodyTooLarge, GuardMiddleware
from llamaserve.server.completions import Run
from llamaserve.server.metrics import Metrics
from llamaserve.server.protocol import error_body
from llamaserve.server.settings import ServerSettings

access_log = logging.getLogger("llamaserve.access")


class APIError(Exception):
    """An error with an HTTP status and OpenAI's error shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


@dataclass
class AppState:
    """Everything the routes share; one per app."""

    settings: ServerSettings
    metrics: Metrics
    engine: AsyncEngine | None = None  # None while the model loads
    model_name: str = ""
    draining: bool = False
    avg_completion_tokens: float = 128.0
    admitted: weakref.WeakSet[Run] = field(default_factory=weakref.WeakSet)  # a run leaves when collected

    def stats(self) -> tuple[EngineStats, int]:
        if self.engine is None:
            return EngineStats(0, 0, 0, 0.0, 0, 0, 0.0), 0
        return self.engine.stats, self.engine.num_waiting_requests

    def ready_engine(self) -> AsyncEngine:
        """The engine, or a 503 while loading, draining or after a failure."""
        if self.engine is None:
            raise APIError(503, "the model is still loading", "service_unavailable", code="loading")
        if self.draining:
            raise APIError(503, "the server is shutting down", "service_unavailable", code="draining")
        if not self.engine.healthy:
            raise APIError(503, self.engine.error or "the engine is not running", "service_unavailable",
                           code="engine_failed")
        return self.engine

    def admit(self, run: Run) -> None:
        """Check the queue bound before a generation starts; 429 with Retry-After past it."""
        engine = self.ready_engine()
        # Runs admitted a moment ago may not have reached the engine yet: they wait too.
        waiting = engine.num_waiting_requests + sum(r.unstarted for r in self.admitted)
        # Free running slots take waiting requests at the next step: only the rest really queue.
        free = max(0, engine.engine.config.max_num_seqs - engine.stats.num_running_requests)
        if waiting + 1 - free > self.settings.max_queue:
            self.metrics.rejected.inc()
            rate = engine.stats.tokens_per_second
            wait = (waiting + 1) * self.avg_completion_tokens / rate if rate > 0 else 1.0
            retry = str(min(60, max(1, math.ceil(wait))))
            raise APIError(429, f"the server is at capacity: {waiting} requests are already waiting "
                           f"(--max-queue {self.settings.max_queue}); retry after {retry} s",
                           "rate_limit_error", code="queue_full", headers={"Retry-After": retry})
        self.admitted.add(run)

    def check_model(self, model: str | None) -> None:
        if model and model != self.model_name:
            raise APIError(404, f"model {model!r} does not exist; this server serves {self.model_name!r}",
                           "not_found_error", "model", "model_not_found")


def _error(status: int, message: str, type_: str, param: str | None = None, code: Any = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return _error(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            msg = "request body is not valid JSON"
        return _error(400, f"{param}: {msg}" if param else msg, "invalid_request_error", param)

    @app.exception_handler(ValueError)
    async def bad_value(_: Request, e: ValueError) -> JSONResponse:
        return _error(400, str(e), "invalid_request_error")

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, _: BodyTooLarge) -> JSONResponse:
        limit = request.app.state.llamaserve.settings.max_body_bytes
        return _error(413, f"request body exceeds {limit} bytes", "invalid_request_error",
                      code="request_too_large")

    @app.exception_handler(EngineDeadError)
    async def dead(_: Request, e: EngineDeadError) -> JSONResponse:
        return _error(503, str(e), "service_unavailable", code="engine_failed")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        detail = "no such route" if e.status_code == 404 else str(e.detail)
        return _error(e.status_code, detail, kind)

    @app.exception_handler(Exception)
    async def crash(_: Request, e: Exception) -> JSONResponse:
        logging.getLogger("llamaserve").exception("unhandled error")
        return _error(500, f"internal error: {type(e).__name__}", "internal_error")


class AccessLogMiddleware:
    """One JSON line per request, written once the response's last byte has gone out (or the client left).

    Plain ASGI: Starlette's BaseHTTPMiddleware would log a stream before it ends, and it hides client
    disconnects from Request.is_disconnected().
    """

    def __init__(self, app: Any, state: AppState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        status = 500  # if the app fails before it starts a response

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self._log(scope, status, start)

    def _log(self, scope: dict, status: int, start: float) -> None:
        route = getattr(scope.get("route"), "path", "unmatched")
        self.state.metrics.requests.labels(route, str(status)).inc()
        if self.state.settings.log_requests and scope["path"] != "/metrics":
            info = scope.get("state", {}).get("run_info", {})  # set by the route, through request.state
            access_log.info(json.dumps({
                "id": info.get("id"), "method": scope["method"], "path": scope["path"],
                "status": status, "prompt_tokens": info.get("prompt_tokens"),
                "completion_tokens": info.get("completion_tokens"), "ttft_s": info.get("ttft"),
                "duration_s": round(time.monotonic() - start, 4),
            }))


def create_app(engine: AsyncEngine | None, settings: ServerSettings, model_name: str = "") -> FastAPI:
    """Build the app; `engine` may be attached later with attach_engine (503s until then)."""
    app = FastAPI(title="llamaserve", version="0.1.0", description="OpenAI-compatible Llama server")
    state = AppState(settings, Metrics(lambda: state.stats()))
    app.state.llamaserve = state
    if engine is not None:
        attach_engine(app, engine, model_name)
    _install_error_handlers(app)
    app.add_middleware(GuardMiddleware, api_keys=settings.api_keys, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(AccessLogMiddleware, state=state)  # added last, so outermost: 401s and 413s too

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            state.ready_engine()
        except APIError as e:
            return JSONResponse({"status": e.code}, status_code=503)
        engine = state.engine.engine  # type: ignore[union-attr]  # (ready_engine checked it)
        in_use = engine.num_blocks - engine.block_manager.num_free_blocks
        kv = engine.kv_plan.as_dict() | {"blocks_in_use": in_use}
        return JSONResponse({"status": "ok", "max_model_len": engine.max_model_len, "kv_cache": kv})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    routes.install(app, state)
    return app


def attach_engine(app: FastAPI, engine: AsyncEngine, model_name: str) -> None:
    state: AppState = app.state.llamaserve
    state.model_name = state.settings.served_model_name or model_name
    state.engine = engine
