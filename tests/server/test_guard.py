"""Hostile and oversized input, refused before it costs anything: Host checks, non-JSON bodies, CORS,
tenant isolation of the prefix cache, prompt caps and texts far larger than the context (issue 13)."""

from __future__ import annotations

import jsonschema
import pytest
from starlette.testclient import TestClient

from llamaserve.server.app import create_app
from llamaserve.server.settings import ServerSettings, default_allowed_hosts
from tests.server.test_routes import CHAT, MODEL, FakeEngine, make


def test_a_host_not_allowed_is_refused_before_anything_else() -> None:
    engine = FakeEngine()
    app = create_app(engine, ServerSettings(log_requests=False, api_keys=("k",),  # type: ignore[arg-type]
                                            allowed_hosts=default_allowed_hosts("127.0.0.1")), MODEL)
    ok = TestClient(app, base_url="http://127.0.0.1:8000", headers={"Authorization": "Bearer k"})
    assert ok.post("/v1/chat/completions", json=CHAT).status_code == 200
    for host in ("localhost:8000", "[::1]:8000", "127.0.0.1"):
        assert ok.get("/health", headers={"Host": host}).status_code in (200, 503)
    rebound = TestClient(app, base_url="http://attacker.example:8000", headers={"Authorization": "Bearer k"})
    r = rebound.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 400 and r.json()["error"]["code"] == "host_not_allowed"
    assert len(engine.calls) == 1  # only the allowed one reached the engine


def test_default_hosts_depend_on_the_bind_address() -> None:
    assert "localhost" in default_allowed_hosts("127.0.0.1") and default_allowed_hosts("0.0.0.0") == ()


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_a_post_body_that_is_not_json_is_415(content_type: str | None) -> None:
    client, engine = make()
    headers = {} if content_type is None else {"Content-Type": content_type}
    r = client.post("/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "Hi"}]}',
                    headers=headers)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    assert engine.calls == []


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON", "application/vnd.api+json"])
def test_json_content_types_are_accepted(content_type: str) -> None:
    client, _ = make()
    r = client.post("/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "Hi"}]}',
                    headers={"Content-Type": content_type})
    assert r.status_code == 200, r.text


def test_cors_is_off_by_default_and_opt_in() -> None:
    client, _ = make()
    r = client.post("/v1/chat/completions", json=CHAT, headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in r.headers
    client, _ = make(cors_origins=("https://app.example",), api_keys=("k",))
    pre = client.options("/v1/chat/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://app.example"
    r = client.post("/v1/chat/completions", json=CHAT,
                    headers={"Origin": "https://app.example", "Authorization": "Bearer k"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    other = client.options("/v1/chat/completions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in other.headers


def test_each_api_key_gets_its_own_prefix_cache_salt() -> None:
    client, engine = make(api_keys=("alice", "bob"))
    for key in ("alice", "bob", "alice"):
        assert client.post("/v1/chat/completions", json=CHAT,
                           headers={"Authorization": f"Bearer {key}"}).status_code == 200
    salts = [c.params.cache_salt for c in engine.calls]
    assert salts[0] == salts[2] and salts[0] != salts[1] and None not in salts
    assert "alice" not in "".join(salts)  # the salt names the key's position, never the key


def test_cache_salt_field_is_passed_on_and_combined_with_the_key() -> None:
    client, engine = make()
    client.post("/v1/chat/completions", json=CHAT | {"cache_salt": "tenant-7"})
    client.post("/v1/chat/completions", json=CHAT)
    assert [c.params.cache_salt for c in engine.calls] == ["tenant-7", None]
    client, engine = make(api_keys=("k",))
    client.post("/v1/completions", json={"prompt": "ab", "cache_salt": "x"},
                headers={"Authorization": "Bearer k"})
    assert engine.calls[0].params.cache_salt == "key-0|x"


def test_too_many_prompts_is_400_naming_the_flag() -> None:
    client, engine = make(max_prompts=4)
    r = client.post("/v1/completions", json={"prompt": ["a"] * 5})
    assert r.status_code == 400 and "--max-prompts" in r.json()["error"]["message"]
    assert client.post("/v1/completions", json={"prompt": ["a"] * 4}).status_code == 200
    assert len(engine.calls) == 1


@pytest.mark.parametrize("body", [
    CHAT | {"messages": [{"role": "user", "content": "x" * 140_000}]},
    {"prompt": "x" * 140_000},
    {"prompt": ["x" * 70_000, "y" * 70_000]},
])
def test_a_text_far_larger_than_the_context_is_refused_before_tokenizing(body: dict) -> None:
    engine = FakeEngine(max_model_len=4096)  # 4096 x 32 = 131,072 characters at most
    calls: list[int] = []
    encode = engine.tokenizer.encode
    engine.tokenizer.encode = (  # type: ignore[method-assign]
        lambda text, *a, **k: calls.append(len(text)) or encode(text, *a, **k))
    client, _ = make(engine)
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = client.post(path, json=body)
    assert r.status_code == 400 and "characters" in r.json()["error"]["message"]
    assert calls == [] and engine.calls == []


@pytest.mark.parametrize("field,value", [("max_tokens", True), ("stream", "yes"), ("temperature", "0.5"),
                                         ("n", 1.5), ("logprobs", 1)])
def test_types_are_strict(field: str, value: object) -> None:
    client, engine = make()
    r = client.post("/v1/chat/completions", json=CHAT | {field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    assert engine.calls == []


def test_head_health_and_the_allow_header_of_a_405() -> None:
    client, _ = make()
    assert client.head("/health").status_code == 200
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_the_openapi_schema_says_what_the_server_answers() -> None:
    client, _ = make()
    schema = client.get("/openapi.json").json()
    posts = {path: ops["post"] for path, ops in schema["paths"].items() if "post" in ops}
    assert "/v1/chat/completions" in posts and all("422" not in op["responses"] for op in posts.values())
    assert all("400" in op["responses"] for op in posts.values())
    assert "text/plain" in next(iter(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]))
    predict = schema["components"]["schemas"]["PredictRequest"]
    assert [branch["required"] for branch in predict["anyOf"]] == [["prompt"], ["query"]]
    assert client.post("/predict", json={}).status_code == 400  # outside the schema, and refused


@pytest.mark.parametrize("path,field,value,harmless", [
    ("/v1/chat/completions", "modalities", [], ["text"]), ("/v1/chat/completions", "store", True, False),
    ("/v1/chat/completions", "service_tier", "flex", "auto"), ("/v1/chat/completions", "verbosity", {}, None),
    ("/v1/completions", "best_of", 2, 1), ("/v1/completions", "suffix", "x", "")])
def test_fields_we_do_not_honour_are_refused_by_name_and_the_schema_admits_only_their_harmless_values(
        path: str, field: str, value: object, harmless: object) -> None:
    client, engine = make()
    body = CHAT if "chat" in path else {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    r = client.post(path, json=body | {field: value})
    assert r.status_code == 400 and f"'{field}' is not supported" in r.json()["error"]["message"], r.text
    assert engine.calls == []
    assert client.post(path, json=body | {field: harmless}).status_code == 200
    name = "ChatCompletionRequest" if "chat" in path else "CompletionRequest"
    prop = client.get("/openapi.json").json()["components"]["schemas"][name]["properties"][field]
    jsonschema.validate(harmless, prop)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(value, prop)


def test_an_integral_float_is_an_integer_as_in_json_schema() -> None:
    client, engine = make()
    assert client.post("/v1/chat/completions", json=CHAT | {"max_tokens": 3.0, "n": 1.0}).status_code == 200
    assert engine.calls[-1].params.max_tokens == 3
