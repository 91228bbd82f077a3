"""The REST API over HTTP (httpx): /predict, tokenize, models, auth, errors, limits, metrics, access log."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from llamaserve.config import EngineConfig
from llamaserve.engine.async_engine import AsyncEngine
from llamaserve.engine.llm_engine import LLMEngine
from llamaserve.server.app import attach_engine, create_app
from llamaserve.server.settings import ServerSettings
from tests.e2e.conftest import KEY, MODEL, Live, started_server

DOC_PATHS = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


def assert_error(r: httpx.Response, status: int) -> dict:
    """The response has `status` and OpenAI's error shape; returns the error object."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def metric(text: str, name: str) -> float:
    """The value of an unlabelled sample in a Prometheus text exposition."""
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


@pytest.fixture(scope="module")
def client(server: Live) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def test_predict_prompt_and_query(client: httpx.Client) -> None:
    a = client.post("/predict", json={"prompt": "What is 2+2?", "max_tokens": 4})
    b = client.post("/predict", json={"query": "What is 2+2?", "max_tokens": 4})
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    assert set(a.json()) >= {"response", "finish_reason", "usage"}
    assert a.json()["response"] and a.json()["response"] == b.json()["response"]  # greedy by default
    usage = a.json()["usage"]
    assert usage["completion_tokens"] <= 4 and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert a.json()["finish_reason"] in ("stop", "length")


def test_predict_needs_a_prompt(client: httpx.Client) -> None:
    assert_error(client.post("/predict", json={}), 400)
    assert_error(client.post("/predict", json={"prompt": ""}), 400)


def test_tokenize_detokenize_round_trip(client: httpx.Client) -> None:
    text = "Hello, paged attention! Ünïcödé ✓"
    r = client.post("/tokenize", json={"prompt": text, "add_special_tokens": False})
    assert r.status_code == 200, r.text
    tokens = r.json()["tokens"]
    assert r.json()["count"] == len(tokens) > 0
    back = client.post("/detokenize", json={"tokens": tokens})
    assert back.status_code == 200 and back.json()["prompt"] == text
    assert_error(client.post("/detokenize", json={"tokens": [-1]}), 400)
    assert_error(client.post("/detokenize", json={"tokens": [10**9]}), 400)
    assert_error(client.post("/tokenize", json={}), 400)


def test_models(client: httpx.Client) -> None:
    r = client.get("/v1/models")
    assert r.status_code == 200
    data = r.json()["data"]
    assert [m["id"] for m in data] == [MODEL] and data[0]["object"] == "model"
    one = client.get(f"/v1/models/{MODEL}")
    assert one.status_code == 200 and one.json()["id"] == MODEL
    assert assert_error(client.get("/v1/models/nope"), 404)["code"] == "model_not_found"


def test_health_is_open_but_models_are_not(server: Live) -> None:
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert_error(httpx.get(f"{server.url}/v1/models"), 401)


def _flat(routes: list) -> list:
    """The app's routes, with those of included routers (FastAPI keeps them behind a wrapper)."""
    out = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        out += _flat(inner.routes) if inner is not None else [route]
    return out


def _api_routes(server: Live) -> list[tuple[str, str]]:
    routes = []
    for route in _flat(server.app.routes):
        if not isinstance(route, APIRoute) or route.path == "/health" or route.path in DOC_PATHS:
            continue
        if route.path == "/" or route.path.startswith("/ui/"):  # the playground: open, it asks for the key
            continue
        path = route.path.replace("{model_id:path}", MODEL)
        routes += [(method, path) for method in sorted(route.methods)]
    return routes


def test_every_route_but_health_needs_the_key(server: Live) -> None:
    routes = _api_routes(server)
    assert len(routes) >= 8  # every API route is covered, including ones added later
    bad = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "test-key"},
           {"Authorization": "Basic test-key"}, {"Authorization": "Bearer"}]
    with httpx.Client(base_url=server.url, timeout=10) as c:
        for method, path in routes:
            for headers in bad:
                r = c.request(method, path, headers=headers, json={"prompt": "hi"})
                assert r.headers.get("www-authenticate") == "Bearer"
                if path.startswith("/v1/messages"):  # Anthropic's shape
                    assert r.status_code == 401 and r.json()["type"] == "error"
                    assert r.json()["error"]["type"] == "authentication_error", (method, path)
                elif path.startswith("/api/"):  # Ollama's
                    assert r.status_code == 401 and set(r.json()) == {"error"}
                    assert "API key" in r.json()["error"], (method, path)
                else:
                    error = assert_error(r, 401)
                    assert error["type"] == "authentication_error", (method, path)


def test_malformed_json_is_400(client: httpx.Client) -> None:
    for path in ("/v1/chat/completions", "/v1/completions", "/predict", "/tokenize"):
        r = client.post(path, content=b'{"prompt": "hi",', headers={"Content-Type": "application/json"})
        error = assert_error(r, 400)
        assert error["type"] == "invalid_request_error" and "JSON" in error["message"]
    # valid JSON of the wrong shape
    assert_error(client.post("/v1/completions", json=["not", "an", "object"]), 400)
    assert_error(client.post("/v1/chat/completions", json={"messages": "hi"}), 400)


@pytest.mark.parametrize(("path", "body"), [
    ("/tokenize", '{"prompt": "a\\ud800"}'),
    ("/predict", '{"prompt": "hi", "system": "\\udfff", "max_tokens": 1}'),
    ("/v1/completions", '{"prompt": ["ok", "\\ud800"], "max_tokens": 1}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\udc00"}], "max_tokens": 1}'),
])
def test_lone_surrogate_is_400(client: httpx.Client, path: str, body: str) -> None:
    # valid JSON, but no text: the tokenizer would raise a TypeError (a 500 before the fix)
    r = client.post(path, content=body.encode(), headers={"Content-Type": "application/json"})
    assert "surrogate" in assert_error(r, 400)["message"]


def test_unknown_route_is_404(client: httpx.Client) -> None:
    assert assert_error(client.get("/v2/nothing"), 404)["type"] == "not_found_error"
    assert_error(client.post("/v1/nothing", json={}), 404)


def test_body_over_the_limit_is_413(server: Live, client: httpx.Client) -> None:
    limit = server.app.state.llamaserve.settings.max_body_bytes
    big = json.dumps({"prompt": "x" * (limit + 10)}).encode()
    r = client.post("/v1/completions", content=big, headers={"Content-Type": "application/json"})
    assert assert_error(r, 413)["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must hold while reading
        for i in range(0, len(big), 16 * 1024):
            yield big[i : i + 16 * 1024]

    r = client.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in r.request.headers
    assert assert_error(r, 413)["code"] == "request_too_large"
    assert client.get("/v1/models").status_code == 200  # the server is fine afterwards


METRIC_NAMES = (
    "llamaserve_num_requests_running", "llamaserve_num_requests_waiting", "llamaserve_kv_cache_usage_perc",
    "llamaserve_prefix_cache_hits_total", "llamaserve_prefix_cache_queries_total",
    "llamaserve_prompt_tokens_total", "llamaserve_generation_tokens_total",
    "llamaserve_time_to_first_token_seconds_bucket", "llamaserve_time_per_output_token_seconds_bucket",
    "llamaserve_e2e_request_latency_seconds_bucket", "llamaserve_requests_rejected_queue_full_total",
    "llamaserve_num_preemptions_total",
)


def test_metrics(client: httpx.Client) -> None:
    before = client.get("/metrics")
    assert before.status_code == 200 and before.headers["content-type"].startswith("text/plain")
    for name in METRIC_NAMES:
        assert re.search(rf"^{name}[ {{]", before.text, re.M), name
    # twice the same 2-block prompt: the second finds its first full block in the prefix cache
    body = {"prompt": "The sky is blue and the grass is green; " * 4, "max_tokens": 3, "temperature": 0,
            "ignore_eos": True}
    usages = [client.post("/v1/completions", json=body).json()["usage"] for _ in range(2)]
    after = client.get("/metrics").text

    def grew(name: str) -> float:
        return metric(after, name) - metric(before.text, name)

    assert grew("llamaserve_prompt_tokens_total") >= 2 * usages[0]["prompt_tokens"] > 32
    assert grew("llamaserve_generation_tokens_total") >= 6
    assert usages[1]["prompt_tokens_details"]["cached_tokens"] >= 16
    assert grew("llamaserve_prefix_cache_hits_total") >= 16
    assert grew("llamaserve_prefix_cache_queries_total") >= 32
    for histogram in ("e2e_request_latency_seconds", "time_to_first_token_seconds",
                      "time_per_output_token_seconds"):
        assert grew(f"llamaserve_{histogram}_count") >= 2
    assert re.search(r'^llamaserve_requests_total\{route="/v1/completions",status="200"\} [1-9]', after,
                     re.M)


def test_health_and_routes_503_until_the_engine_is_attached(engine: AsyncEngine,
                                                            llm_engine: LLMEngine) -> None:
    app = create_app(None, ServerSettings(api_keys=(KEY,)))
    client = TestClient(app, headers={"Authorization": f"Bearer {KEY}"})
    health = client.get("/health")
    assert health.status_code == 503 and health.json() == {"status": "loading"}
    assert assert_error(client.get("/v1/models"), 503)["code"] == "loading"
    assert assert_error(client.post("/v1/completions", json={"prompt": "hi"}), 503)["code"] == "loading"
    assert client.get("/metrics").status_code == 200
    attach_engine(app, engine, MODEL)
    health = client.get("/health")
    assert health.status_code == 200
    kv, llm = health.json()["kv_cache"], llm_engine  # the engine thread's LLMEngine
    assert health.json()["status"] == "ok" and health.json()["max_model_len"] == llm.max_model_len
    assert kv["tokens"] == llm.num_blocks * 16 == kv["blocks"] * kv["block_size"]
    assert kv["dtype"] == llm.kv_plan.dtype_name and llm.kv_plan.dtype == llm.runner.cache.dtype
    assert kv["bytes_per_token"] == 2 * 30 * 3 * 64 * llm.runner.cache.kv[0].element_size()  # SmolLM2
    assert kv["bytes"] == kv["tokens"] * kv["bytes_per_token"] and 0 <= kv["blocks_in_use"] <= kv["blocks"]
    assert client.get("/v1/models").json()["data"][0]["id"] == MODEL
    app.state.llamaserve.draining = True
    assert client.get("/health").json() == {"status": "draining"}
    assert assert_error(client.post("/tokenize", json={"prompt": "hi"}), 503)["code"] == "draining"


def _access_lines(caplog: pytest.LogCaptureFixture, rid: str | None, timeout: float = 5.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:  # a stream's line is written when its last chunk has gone out, just after the client's read
        lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "llamaserve.access"]
        mine = [line for line in lines if line["id"] == rid]
        if mine or time.monotonic() > deadline:
            return mine
        time.sleep(0.05)


def test_access_log_line(client: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="llamaserve.access")
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0,
            "ignore_eos": True}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    [line] = _access_lines(caplog, r.json()["id"])
    assert line["status"] == 200 and line["path"] == "/v1/chat/completions" and line["method"] == "POST"
    assert line["prompt_tokens"] == r.json()["usage"]["prompt_tokens"]
    assert line["completion_tokens"] == 3
    assert line["ttft_s"] >= 0 and line["duration_s"] >= line["ttft_s"]


def test_access_log_line_of_a_stream(client: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="llamaserve.access")
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    rid = json.loads(events[0])["id"]
    [line] = _access_lines(caplog, rid)
    assert line["status"] == 200
    assert line["prompt_tokens"] > 0 and line["completion_tokens"] == 3
    assert line["ttft_s"] is not None and line["duration_s"] >= line["ttft_s"]


def test_access_log_of_client_errors(client: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="llamaserve.access")
    assert client.post("/v1/completions", json={"prompt": "x", "temperature": 5}).status_code == 400
    assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    lines = _access_lines(caplog, None)  # client errors carry no request id
    assert any(line["status"] == 400 and line["path"] == "/v1/completions" for line in lines)
    assert any(line["status"] == 401 and line["path"] == "/v1/models" for line in lines)


@contextmanager
def broken_server(llm_engine: LLMEngine, method: str = "step") -> Iterator[Live]:
    """A server whose engine fails the first time it calls `method`, as a model or kernel failure would."""
    config = EngineConfig(kv_cache_memory=0.01, max_num_seqs=1, max_model_len=64)
    broken = LLMEngine(llm_engine.runner.model, llm_engine.tokenizer, config)

    def fail(*args: object) -> list:
        raise RuntimeError("kernel exploded")

    setattr(broken, method, fail)
    with started_server(broken) as live:
        yield live


@pytest.mark.parametrize("method", ["step", "add_request"])
def test_engine_failure_fails_requests_with_503(llm_engine: LLMEngine, method: str) -> None:
    with broken_server(llm_engine, method) as live, live.client(timeout=10) as c:
        r = c.post("/predict", json={"prompt": "hi", "max_tokens": 4})  # in flight when it fails
        error = assert_error(r, 503)
        assert error["code"] == "engine_failed" and "kernel exploded" in error["message"]
        health = httpx.get(f"{live.url}/health")
        assert health.status_code == 503 and health.json() == {"status": "engine_failed"}
        after = c.post("/v1/completions", json={"prompt": "hi"})
        assert assert_error(after, 503)["code"] == "engine_failed"
        assert c.get("/metrics").status_code == 200  # still scrapeable


def test_engine_failure_mid_stream_is_reported_in_band(llm_engine: LLMEngine) -> None:
    with broken_server(llm_engine) as live, live.client() as c:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200  # the header went out before the failure
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        errors = [json.loads(e)["error"] for e in events[:-1] if "error" in json.loads(e)]
        assert len(errors) == 1 and "kernel exploded" in errors[0]["message"]
        assert set(errors[0]) == {"message", "type", "param", "code"} and errors[0]["code"] == "engine_failed"


def test_a_stuck_step_fails_requests_turns_health_503_and_stops_the_server(llm_engine: LLMEngine) -> None:
    """A step that never returns: the watchdog fails the request in-band, /health says 503 and serve's
    loop is told to stop (the process then exits 3 for its supervisor)."""
    from llamaserve.server.serve import watch_engine

    config = EngineConfig(kv_cache_memory=0.01, max_num_seqs=1, max_model_len=64)
    stuck = LLMEngine(llm_engine.runner.model, llm_engine.tokenizer, config)
    release = threading.Event()
    stuck.step = lambda: release.wait(30) and []  # type: ignore[method-assign]
    with started_server(stuck) as live, live.client(timeout=30) as c:
        server = types.SimpleNamespace(should_exit=False)
        result: list[httpx.Response] = []
        worker = threading.Thread(target=lambda: result.append(
            c.post("/predict", json={"prompt": "hi", "max_tokens": 4})))
        worker.start()
        time.sleep(0.5)
        assert not watch_engine(server, live.app, step_timeout=5.0)  # not stuck long enough yet
        assert watch_engine(server, live.app, step_timeout=0.2) and server.should_exit
        worker.join(10)
        error = assert_error(result[0], 503)
        assert error["code"] == "engine_failed" and "has not returned" in error["message"]
        assert httpx.get(f"{live.url}/health").status_code == 503
        release.set()
