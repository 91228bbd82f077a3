"""ASGI guards in front of every route: the Host check, bearer-key auth (all but /health), JSON bodies
only (415 otherwise), and the body-size limit."""

from __future__ import annotations

import hmac
import json
from typing import Any

from starlette.exceptions import HTTPException

from llamaserve.server.protocol import error_for_path

OPEN_PATHS = frozenset({"/health", "/"})  # and the playground's files under /ui/: the page asks for the key


async def _send_json(send: Any, status: int, body: dict, headers: list | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())] + (headers or [])})
    await send({"type": "http.response.body", "body": data})


class GuardMiddleware:
    """400 for a Host not allowed (DNS rebinding); 401 without a valid `Authorization: Bearer <key>`;
    415 for a POST body that is not JSON (a browser's no-preflight cross-site POST is text/plain or a
    form); 413 for bodies over max_body_bytes."""

    def __init__(self, app: Any, api_keys: tuple[str, ...], max_body_bytes: int,
                 allowed_hosts: tuple[str, ...] = ()) -> None:
        self.app = app
        self.keys = [k.encode() for k in api_keys]
        self.max_body = max_body_bytes
        self.hosts = frozenset(h.lower().strip("[]") for h in allowed_hosts)

    def _key_index(self, scope: dict) -> int | None:
        """Which key the request carries (-1: no key needed), None when it carries no valid one."""
        if not self.keys or scope["path"] in OPEN_PATHS or scope["path"].startswith("/ui/"):
            return -1
        headers = dict(scope.get("headers") or [])
        header = headers.get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            if b"x-api-key" not in headers:  # Anthropic's clients send the key so
                return None
            token = headers[b"x-api-key"]
        matches = [hmac.compare_digest(token.strip(), k) for k in self.keys]  # every key, in constant time
        return matches.index(True) if any(matches) else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.hosts and _host_name(headers.get(b"host", b"")) not in self.hosts:
            await _send_json(send, 400, error_for_path(
                scope["path"], 400,
                "the Host header names a host this server does not answer for (see --allowed-hosts)",
                "invalid_request_error", None, "host_not_allowed"))
            return
        key = self._key_index(scope)
        if key is None:
            await _send_json(send, 401, error_for_path(
                scope["path"], 401, "missing or invalid API key: send 'Authorization: Bearer <key>' (or "
                "'x-api-key: <key>')", "authentication_error", None, "invalid_api_key"),
                [(b"www-authenticate", b"Bearer")])
            return
        # The tenant, for the prefix cache: requests under different keys never share cached blocks.
        scope.setdefault("state", {})["tenant"] = None if key < 0 else f"key-{key}"
        has_body = headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers
        if scope["method"] == "POST" and has_body and not _is_json(headers.get(b"content-type", b"")):
            await _send_json(send, 415, error_for_path(
                scope["path"], 415, "send the body as JSON, with 'Content-Type: application/json'",
                "invalid_request_error", None, "unsupported_media_type"))
            return
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await _send_json(send, 413, error_for_path(
                scope["path"], 413, f"request body exceeds {self.max_body} bytes", "invalid_request_error",
                None, "request_too_large"))
            return
        await self.app(scope, self._limited(receive), send)

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


def _host_name(host: bytes) -> str:
    """The name in a Host header, without the port (IPv6 literals lose their brackets)."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1:].split("]", 1)[0]
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


def _is_json(content_type: bytes) -> bool:
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


class BodyTooLarge(HTTPException):
    """A chunked body grew past the limit while it was being read.

    An HTTPException, because FastAPI turns any other error raised while it reads a body into a 400.
    """

    def __init__(self) -> None:
        super().__init__(413, "request body too large")
