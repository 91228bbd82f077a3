"""The playground's routes, without a browser: what is served, with which headers, and who needs a key."""

from __future__ import annotations

import argparse

from fastapi.testclient import TestClient

from llamaserve.server.app import create_app
from llamaserve.server.settings import ServerSettings, add_server_args, server_settings
from llamaserve.server.ui import FILES, UI_DIR


def _client(**settings: object) -> TestClient:
    return TestClient(create_app(None, ServerSettings(**settings)))  # type: ignore[arg-type]


def test_the_page_and_its_files_are_served_with_a_self_only_policy() -> None:
    c = _client()
    page = c.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "connect-src 'self'" in policy and "unsafe" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    for name, media in FILES.items():
        r = c.get(f"/ui/{name}")
        assert r.status_code == 200 and r.headers["content-type"] == media, name
        assert r.content == (UI_DIR / name).read_bytes()
    # everything the page loads is one of those files: no other host, no file left out
    for ref in ("/ui/app.js", "/ui/style.css", "/ui/vendor/marked.min.js", "/ui/vendor/purify.min.js"):
        assert ref in page.text
    assert "http://" not in page.text and "https://" not in page.text


def test_only_the_listed_files_are_served() -> None:
    c = _client()
    for path in ("/ui/index.py", "/ui/../ui.py", "/ui/vendor/marked.LICENSE.md", "/ui/%2e%2e/app.py"):
        r = c.get(path)
        assert r.status_code == 404, path
        assert "error" in r.json()


def test_the_page_needs_no_key_but_the_api_does() -> None:
    c = _client(api_keys=("k",))
    assert c.get("/").status_code == 200
    assert c.get("/ui/app.js").status_code == 200
    config = c.get("/ui/config.json").json()
    assert config["auth_required"] is True
    assert set(config) == {"auth_required", "defaults"}  # nothing about the model without a key
    assert c.get("/v1/models").status_code == 401
    assert _client().get("/ui/config.json").json()["auth_required"] is False


def test_config_gives_the_servers_sampling_defaults() -> None:
    defaults = _client().get("/ui/config.json").json()["defaults"]
    assert defaults == {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "seed": None,
                        "stop": [], "max_tokens": None}


def test_no_ui_turns_the_page_off() -> None:
    p = argparse.ArgumentParser()
    add_server_args(p)
    assert server_settings(p.parse_args([])).ui is True
    settings = server_settings(p.parse_args(["--no-ui"]))
    assert settings.ui is False
    c = TestClient(create_app(None, settings), base_url="http://127.0.0.1")
    assert c.get("/").status_code == 404
    assert c.get("/ui/app.js").status_code == 404
    assert c.get("/ui/config.json").status_code == 404


def test_the_page_is_not_in_the_api_schema() -> None:
    paths = _client().get("/openapi.json").json()["paths"]
    assert "/" not in paths and not any(p.startswith("/ui") for p in paths)
