"""The web playground: a chat page at `/` and its files under `/ui/`, shipped in the package.

No build step and no other host: the page, its script and style, and two vendored libraries (marked for
Markdown, DOMPurify to clean what marked renders) are files beside this module. A Content-Security-Policy
of 'self' makes the browser refuse any other host too. The page needs no key to load (it asks for one);
`/ui/config.json` says only whether keys are required and the server's sampling defaults.
"""

from __future__ import annotations

import functools
from dataclasses import fields
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from llamaserve.engine.sampling_params import SamplingParams

UI_DIR = Path(__file__).with_name("ui")
FILES = {  # served name -> media type; nothing else under ui/ is served
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "vendor/marked.min.js": "text/javascript; charset=utf-8",
    "vendor/purify.min.js": "text/javascript; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
HEADERS = {
    "Content-Security-Policy": "; ".join((
        "default-src 'self'", "script-src 'self'", "style-src 'self'", "img-src 'self' data:",
        "connect-src 'self'", "object-src 'none'", "base-uri 'none'", "form-action 'none'",
        "frame-ancestors 'none'")),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "seed", "stop")

router = APIRouter(include_in_schema=False)


@functools.cache
def _read(name: str) -> bytes:  # the package's files do not change while it runs: read each once
    return (UI_DIR / name).read_bytes()


def _file(name: str, media_type: str) -> Response:
    return Response(_read(name), media_type=media_type, headers=HEADERS)


@router.get("/")
async def index() -> Response:
    return _file("index.html", "text/html; charset=utf-8")


@router.get("/ui/config.json")
async def config(request: Request) -> JSONResponse:
    """What the page needs before it has a key: whether it needs one, and where sampling starts."""
    state = request.app.state.llamaserve
    defaults: dict[str, Any] = {f.name: f.default for f in fields(SamplingParams) if f.name in DEFAULTS}
    defaults["stop"] = []
    defaults["max_tokens"] = None  # chat: the rest of the context
    return JSONResponse({"auth_required": bool(state.settings.api_keys), "defaults": defaults},
                        headers=HEADERS)


@router.get("/ui/{name:path}")
async def asset(name: str) -> Response:
    if name not in FILES:
        return JSONResponse({"error": {"message": f"no such file: /ui/{name}", "type": "not_found_error",
                                       "param": None, "code": None}}, status_code=404)
    return _file(name, FILES[name])
