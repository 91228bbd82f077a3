"""Connection-level limits uvicorn lacks: a deadline to send a whole request, and a concurrency cap
answered in our error shape.

uvicorn's h11 protocol times out only idle keep-alive connections: a client that sends half a request
line, or headers without their end, or a body slower than a byte a minute, holds a socket (and a file
descriptor) indefinitely. `GuardedH11Protocol` gives every request `read_timeout` seconds from its first
byte (or from the connection's opening) until its body has arrived, then closes the connection.
uvicorn's own `limit_concurrency` answers plain text; ours answers 503 with Retry-After in the JSON
error shape of every other refusal.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

_BUSY = json.dumps({"error": {"message": "the server has too many open connections; retry shortly",
                              "type": "server_busy", "code": 503}}).encode()


class GuardedH11Protocol(H11Protocol):
    read_timeout: float = 30.0
    max_connections: int | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_timer: asyncio.TimerHandle | None = None
        inner = self.app

        async def limited(scope: Any, receive: Any, send: Any) -> None:
            # Counted when the request has arrived, as uvicorn counts: connections open and requests running.
            limit = self.max_connections
            if limit is not None and (len(self.connections) > limit or len(self.tasks) > limit):
                await send({"type": "http.response.start", "status": 503,
                            "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                                        (b"connection", b"close")]})
                await send({"type": "http.response.body", "body": _BUSY})
                return
            await inner(scope, receive, send)

        self.app = limited

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # the first bytes of a new request (or its headers' rest)
            self._arm()
        super().data_received(data)
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):  # the whole request is in
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        self._disarm()  # an idle keep-alive connection is uvicorn's timeout_keep_alive's business
        super().on_response_complete()

    def _arm(self) -> None:
        if self._read_timer is None:
            self._read_timer = self.loop.call_later(self.read_timeout, self._read_timed_out)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.SEND_BODY:  # the app is reading the body: it sees a disconnect
            self.logger.info("closing a connection whose request body did not arrive within %g s",
                             self.read_timeout)
        self.transport.close()


def guarded_protocol(read_timeout: float, max_connections: int | None) -> type[GuardedH11Protocol]:
    """A protocol class with these limits (uvicorn instantiates it per connection)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"read_timeout": read_timeout, "max_connections": max_connections})


def uvicorn_config(app: Any, *, read_timeout: float = 30.0, limit_concurrency: int | None = None,
                   **kwargs: Any) -> uvicorn.Config:
    return uvicorn.Config(app, http=guarded_protocol(read_timeout, limit_concurrency), **kwargs)
