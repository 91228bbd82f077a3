"""ASGI guards in front of every route: bearer-key auth (all but /health) and the body-size limit."""

from __future__ import annotations

import hmac
import json
from typing import Any

from starlette.exceptions import HTTPException

from llamaserve.server.protocol import error_body

OPEN_PATHS = frozenset({"/health"})


async def _send_json(send: Any, status: int, body: dict, headers: list | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())] + (headers or [])})
    await send({"type": "http.response.body", "body": data})


class GuardMiddleware:
    """401 without a valid `Authorization: Bearer <key>`; 413 for bodies over max_body_bytes."""

    def __init__(self, app: Any, api_keys: tuple[str, ...], max_body_bytes: int) -> None:
        self.app = app
        self.keys = [k.encode() for k in api_keys]
        self.max_body = max_body_bytes

    def _authorized(self, scope: dict) -> bool:
        if not self.keys or scope["path"] in OPEN_PATHS:
            return True
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        return any(hmac.compare_digest(token.strip(), k) for k in self.keys)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self._authorized(scope):
            await _send_json(send, 401, error_body(
                "missing or invalid API key: send 'Authorization: Bearer <key>'",
                "authentication_error", None, "invalid_api_key"),
                [(b"www-authenticate", b"Bearer")])
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await _send_json(send, 413, self._too_large())
            return
        await self.app(scope, self._limited(receive), send)

    def _too_large(self) -> dict:
        return error_body(f"request body exceeds {self.max_body} bytes", "invalid_request_error",
                          None, "request_too_large")

    def _limited(self, receive: Any) -> Any:
        seen = 0
        limit = self.max_body

        async def wrapped() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge
            return message

        return wrapped


class BodyTooLarge(HTTPException):
    """A chunked body grew past the limit while it was being read.

    An HTTPException, because FastAPI turns any other error raised while it reads a body into a 400.
    """

    def __init__(self) -> None:
        super().__init__(413, "request body too large")
