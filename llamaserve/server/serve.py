"""`llamaserve serve`: uvicorn up at once (503 while the model loads), SIGTERM drains, then exit 0."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import threading
import time
from typing import Any

import uvicorn

from llamaserve.config import EngineConfig
from llamaserve.engine.async_engine import AsyncEngine
from llamaserve.engine.llm_engine import LLMEngine
from llamaserve.loader.registry import DEFAULT_MODEL
from llamaserve.server.app import attach_engine, create_app
from llamaserve.server.connections import uvicorn_config
from llamaserve.server.settings import server_settings

log = logging.getLogger("llamaserve")


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: refuse new requests (503), let in-flight ones finish, then stop."""

    def __init__(self, config: uvicorn.Config, app: Any, drain_timeout: float) -> None:
        super().__init__(config)
        self.llamaserve_app = app
        self.drain_timeout = drain_timeout
        self._draining = False

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._draining:  # a second signal: stop now
            super().handle_exit(sig, frame)
            return
        self._draining = True
        state = self.llamaserve_app.state.llamaserve
        state.draining = True
        log.info("draining: %d requests in flight, up to %.0f s", self._in_flight(), self.drain_timeout)
        threading.Thread(target=self._drain, daemon=True).start()

    def _in_flight(self) -> int:
        engine = self.llamaserve_app.state.llamaserve.engine
        return 0 if engine is None else engine.num_in_flight

    def _drain(self) -> None:
        self._wait_idle(self.drain_timeout)
        left = self._in_flight()
        if left:  # end them in-band (an error event, then [DONE]; 503 if not streamed), not cut mid-stream
            engine = self.llamaserve_app.state.llamaserve.engine
            engine.fail_all(f"the server is shutting down: this request did not finish within the drain "
                            f"timeout ({self.drain_timeout:g} s)")
            self._wait_idle(5.0)
        log.info("drained (%d stopped at the deadline); shutting down", left)
        self.should_exit = True

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._in_flight() and time.monotonic() < deadline:
            time.sleep(0.05)


# Exit status after an engine failure (an exception in a step, or a step stuck past --step-timeout):
# the requests have been failed in-band and /health says 503; a supervisor restarts the process.
ENGINE_FAILED = 3


def watch_engine(server: uvicorn.Server, app: Any, step_timeout: float) -> bool:
    """One look at the engine: on a failure, stop the server (serve then exits ENGINE_FAILED)."""
    engine = app.state.llamaserve.engine
    if engine is None or not engine.check_stuck(step_timeout):
        return False
    log.error("the engine failed (%s); exiting with status %d for a restart", engine.error, ENGINE_FAILED)
    server.should_exit = True
    return True


def serve(args: argparse.Namespace, config: EngineConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = server_settings(args)
    app = create_app(None, settings)
    http = uvicorn_config(app, read_timeout=settings.read_timeout,
                            limit_concurrency=settings.limit_concurrency, host=settings.host,
                            port=settings.port, log_level="info", access_log=False,
                            timeout_graceful_shutdown=5)
    server = DrainingServer(http, app, settings.drain_timeout)
    failure: list[BaseException] = []

    def load() -> None:
        try:
            start = time.perf_counter()
            engine = LLMEngine.from_model(args.model, config, args.chat_template, progress=True)
            engine.grammars.tokenizer  # noqa: B018  (built now: ~1 s holding the GIL, not on a first request)
            async_engine = AsyncEngine(engine)
            async_engine.start()
            attach_engine(app, async_engine, args.model or DEFAULT_MODEL)
            log.info("model %s loaded in %.1f s; serving on http://%s:%d", args.model or DEFAULT_MODEL,
                     time.perf_counter() - start, settings.host, settings.port)
        except BaseException as e:  # shown to the user as one line, then the server stops
            failure.append(e)
            server.should_exit = True

    failed = threading.Event()

    def watch() -> None:
        while not server.should_exit:
            if watch_engine(server, app, settings.step_timeout):
                failed.set()
                return
            time.sleep(1.0)

    threading.Thread(target=load, name="llamaserve-load", daemon=True).start()
    threading.Thread(target=watch, name="llamaserve-watch", daemon=True).start()
    asyncio.run(server.serve())
    state = app.state.llamaserve
    if state.engine is not None:
        state.engine.shutdown()
    if failure:
        print(f"llamaserve: error: {failure[0]}", file=sys.stderr)
        return 2
    return ENGINE_FAILED if failed.is_set() else 0



