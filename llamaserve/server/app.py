"""create_app(engine, settings): the FastAPI application, with no module-level state."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from llamaserve.engine.async_engine import AsyncEngine, EngineDeadError, EngineStats
from llamaserve.server import routes
from llamaserve.server.auth import BodyTooLarge, GuardMiddleware
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

    def admit(self) -> AsyncEngine:
        """Check the queue bound before a generation starts; 429 with Retry-After past it."""
        engine = self.ready_engine()
        waiting = engine.num_waiting_requests
        if waiting >= self.settings.max_queue:
            self.metrics.rejected.inc()
            rate = engine.stats.tokens_per_second
            wait = (waiting + 1) * self.avg_completion_tokens / rate if rate > 0 else 1.0
            retry = str(min(60, max(1, math.ceil(wait))))
            raise APIError(429, f"the server is at capacity: {waiting} requests are already waiting "
                           f"(--max-queue {self.settings.max_queue}); retry after {retry} s",
                           "rate_limit_error", code="queue_full", headers={"Retry-After": retry})
        return engine

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


def _access_log_middleware(app: FastAPI) -> None:
    @app.middleware("http")
    async def log_request(request: Request, call_next: Any) -> Response:
        start = time.monotonic()
        response: StreamingResponse = await call_next(request)  # always streaming, from call_next
        body = response.body_iterator

        async def logged() -> AsyncIterator[str | bytes | memoryview]:
            try:
                async for chunk in body:
                    yield chunk
            finally:  # after the last chunk of a stream (or a disconnect): the run's numbers are known
                _log_request(request, response.status_code, start)

        response.body_iterator = logged()
        return response


def _log_request(request: Request, status: int, start: float) -> None:
    state: AppState = request.app.state.llamaserve
    route = request.scope.get("route")
    state.metrics.requests.labels(getattr(route, "path", "unmatched"), str(status)).inc()
    if state.settings.log_requests and request.url.path != "/metrics":
        info = getattr(request.state, "run_info", {})
        access_log.info(json.dumps({
            "id": info.get("id"), "method": request.method, "path": request.url.path,
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
    _access_log_middleware(app)  # added last, so outermost: 401s and 413s get their line too

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            state.ready_engine()
        except APIError as e:
            return JSONResponse({"status": e.code}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    routes.install(app, state)
    return app


def attach_engine(app: FastAPI, engine: AsyncEngine, model_name: str) -> None:
    state: AppState = app.state.llamaserve
    state.model_name = state.settings.served_model_name or model_name
    state.engine = engine
