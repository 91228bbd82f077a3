"""create_app(engine, settings): the FastAPI application, with no module-level state."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from llamaserve.engine.async_engine import AsyncEngine, EngineDeadError, EngineStats, QueueFull
from llamaserve.server import anthropic, embeddings, ollama, responses, ui
from llamaserve.server.auth import BodyTooLarge, GuardMiddleware
from llamaserve.server.metrics import Metrics
from llamaserve.server.protocol import error_for_path
from llamaserve.server.routes import router
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

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0, 0.0, 0, 0, 0.0) if self.engine is None else self.engine.stats

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

    def check_model(self, model: str | None) -> None:
        if model and model != self.model_name and model != f"{self.model_name}:latest":  # Ollama's tag
            raise APIError(404, f"model {model!r} does not exist; this server serves {self.model_name!r}",
                           "not_found_error", "model", "model_not_found")


def _error(request: Request, status: int, message: str, type_: str, param: str | None = None,
           code: Any = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = error_for_path(request.url.path, status, message, type_, param, code)
    return JSONResponse(body, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return _error(request, e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request").removeprefix("Value error, ")
        if first.get("type") == "json_invalid":
            msg = "request body is not valid JSON"
        elif first.get("type") == "extra_forbidden":
            msg = "unrecognized request field (this server refuses fields it would otherwise ignore)"
        return _error(request, 400, f"{param}: {msg}" if param else msg, "invalid_request_error", param)

    @app.exception_handler(ValueError)
    async def bad_value(request: Request, e: ValueError) -> JSONResponse:
        return _error(request, 400, str(e), "invalid_request_error")

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, e: QueueFull) -> JSONResponse:
        request.app.state.llamaserve.metrics.rejected.inc()
        return _error(request, 429, str(e), "rate_limit_error", code="queue_full",
                      headers={"Retry-After": str(e.retry_after)})

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, _: BodyTooLarge) -> JSONResponse:
        limit = request.app.state.llamaserve.settings.max_body_bytes
        return _error(request, 413, f"request body exceeds {limit} bytes", "invalid_request_error",
                      code="request_too_large")

    @app.exception_handler(EngineDeadError)
    async def dead(request: Request, e: EngineDeadError) -> JSONResponse:
        return _error(request, 503, str(e), "service_unavailable", code="engine_failed")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        detail = "no such route" if e.status_code == 404 else str(e.detail)
        headers = dict(e.headers) if e.headers else None  # a 405 keeps its Allow header
        return _error(request, e.status_code, detail, kind, headers=headers)

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception) -> JSONResponse:
        logging.getLogger("llamaserve").exception("unhandled error")
        return _error(request, 500, f"internal error: {type(e).__name__}", "internal_error")


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
    state = AppState(settings, Metrics(lambda: state.stats(), lambda: state.model_name))
    app.state.llamaserve = state
    if engine is not None:
        attach_engine(app, engine, model_name)
    _install_error_handlers(app)
    app.add_middleware(GuardMiddleware, api_keys=settings.api_keys, max_body_bytes=settings.max_body_bytes,
                       allowed_hosts=settings.allowed_hosts)
    app.add_middleware(AccessLogMiddleware, state=state)  # outside the guard: 401s, 413s and 415s too
    if settings.cors_origins:  # outermost: a browser's preflight needs no key
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["Retry-After"])

    @app.head("/health", include_in_schema=False)
    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            state.ready_engine()
        except APIError as e:
            return JSONResponse({"status": e.code}, status_code=503)
        engine = state.ready_engine()
        return JSONResponse({"status": "ok", "max_model_len": engine.max_model_len,
                             "kv_cache": engine.kv_cache})

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}})
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(router)
    for api in (anthropic, responses, ollama, embeddings):
        app.include_router(api.router)
    if settings.ui:
        app.include_router(ui.router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, saying 400 where it would say 422: this server answers invalid bodies with 400."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, description=app.description,
                             routes=app.routes)
        for name, path in schema.get("paths", {}).items():
            shape = "AnthropicError" if name.startswith("/v1/messages") else "OllamaError" if \
                name.startswith("/api/") else "Error"

            def error(description: str, shape: str = shape) -> dict[str, Any]:
                return {"description": description, "content": {"application/json": {"schema": {
                    "$ref": f"#/components/schemas/{shape}"}}}}

            for method, operation in path.items():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                responses["401"] = error("Missing or invalid API key")
                responses["503"] = error("Loading, draining, or the engine failed")
                if method == "post":
                    responses["400"] = error("Invalid request (in this API's error shape)")
                    responses["413"] = error("Body over --max-body-bytes")
                    responses["415"] = error("Body not JSON")
                    responses["429"] = error("Queue full (Retry-After says when to retry)")
                if "{" in name or method == "post":
                    responses["404"] = error("No such model")
                if name == "/health":  # its own shape, open to all: {"status": "loading" | "draining" | ...}
                    responses.pop("401")
                    responses["503"] = {"description": "Loading, draining, or the engine failed", "content": {
                        "application/json": {"schema": {"type": "object", "required": ["status"]}}}}
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas["Error"] = {
            "type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["message", "type"],
                "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                               "param": {"type": ["string", "null"]}, "code": {}}}}}
        schemas["AnthropicError"] = {
            "type": "object", "required": ["type", "error"], "properties": {
                "type": {"const": "error"}, "error": {"type": "object", "required": ["type", "message"],
                                                      "properties": {"type": {"type": "string"},
                                                                     "message": {"type": "string"}}}}}
        schemas["OllamaError"] = {"type": "object", "required": ["error"],
                                  "properties": {"error": {"type": "string"}}}
        app.openapi_schema = schema
    return app.openapi_schema


def attach_engine(app: FastAPI, engine: AsyncEngine, model_name: str) -> None:
    state: AppState = app.state.llamaserve
    state.model_name = state.settings.served_model_name or model_name
    state.engine = engine
