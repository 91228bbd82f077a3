"""Live servers for the end-to-end tests: the embedded SmolLM2, loaded once, behind uvicorn threads.

Package-scoped: the model, its engine threads and the one-torch-thread setting end with this package.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from llamaserve.config import EngineConfig
from llamaserve.engine.async_engine import AsyncEngine
from llamaserve.engine.llm_engine import LLMEngine
from llamaserve.server.app import create_app
from llamaserve.server.connections import uvicorn_config
from llamaserve.server.settings import ServerSettings

MODEL = "smollm2-135m-instruct"
KEY = "test-key"


@dataclass(frozen=True, slots=True)
class Live:
    """A running server: its base URL, key, app and the engine behind it."""

    url: str
    key: str
    app: FastAPI
    engine: AsyncEngine

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def client(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout)


@contextmanager
def serve_app(app: FastAPI, engine: AsyncEngine, key: str = KEY) -> Iterator[Live]:
    """Run `app` with uvicorn in a thread on a free port of 127.0.0.1 until the block exits."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn_config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}",
                              daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the test server on {url} did not become healthy")
        time.sleep(0.05)
    try:
        yield Live(url, key, app, engine)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="package")
def llm_engine() -> Iterator[LLMEngine]:
    """The one loaded model (tests/conftest.py gives torch one thread for the whole run)."""
    return LLMEngine.from_model(None, EngineConfig(kv_cache_memory=0.25, max_num_seqs=8))


def _started(engine: LLMEngine) -> AsyncEngine:
    async_engine = AsyncEngine(engine)
    async_engine.start()
    return async_engine


@contextmanager
def started_server(llm_engine: LLMEngine) -> Iterator[Live]:
    """A started AsyncEngine over `llm_engine` behind an app with the test key; stopped on exit."""
    async_engine = _started(llm_engine)
    try:
        app = create_app(async_engine, ServerSettings(api_keys=(KEY,)), MODEL)
        with serve_app(app, async_engine) as live:
            yield live
    finally:
        async_engine.shutdown()


@pytest.fixture(scope="package")
def engine(llm_engine: LLMEngine) -> Iterator[AsyncEngine]:
    async_engine = _started(llm_engine)
    yield async_engine
    async_engine.shutdown()


@pytest.fixture(scope="package")
def small_engine(llm_engine: LLMEngine) -> Iterator[AsyncEngine]:
    """One sequence at a time over a 64-token context; shares the weights, has its own KV pool."""
    config = EngineConfig(kv_cache_memory=0.02, max_num_seqs=1, max_model_len=64)
    async_engine = _started(LLMEngine(llm_engine.runner.model, llm_engine.tokenizer, config))
    yield async_engine
    async_engine.shutdown()


@pytest.fixture(scope="package")
def server(engine: AsyncEngine) -> Iterator[Live]:
    """The shared server: key "test-key", 256 KiB body limit, the full 8192-token context."""
    settings = ServerSettings(api_keys=(KEY,), max_body_bytes=256 * 1024)
    with serve_app(create_app(engine, settings, MODEL), engine) as live:
        yield live


@pytest.fixture(scope="package")
def queue_server(small_engine: AsyncEngine) -> Iterator[Live]:
    """At most 2 waiting requests over the one-sequence engine: the rest get 429."""
    settings = ServerSettings(api_keys=(KEY,), max_queue=2)
    with serve_app(create_app(small_engine, settings, MODEL), small_engine) as live:
        yield live
