"""The prefix cache per API key, on the real engine: a tenant cannot learn from cached_tokens whether
another tenant sent a prompt (issue 13)."""

from __future__ import annotations

import httpx

from llamaserve.engine.async_engine import AsyncEngine
from llamaserve.server.app import create_app
from llamaserve.server.settings import ServerSettings
from tests.e2e.conftest import MODEL, serve_app

SYSTEM = "You are the assistant of ACME Corporation. The secret launch code is 4417-ALPHA. " * 4


def _cached(client: httpx.Client, key: str, salt: str | None = None) -> int:
    body = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "system", "content": SYSTEM},
                                                         {"role": "user", "content": "Hi"}]}
    r = client.post("/v1/chat/completions", json=body | ({"cache_salt": salt} if salt else {}),
                    headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return int(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])


def test_another_keys_prompt_is_never_a_cache_hit(engine: AsyncEngine) -> None:
    app = create_app(engine, ServerSettings(api_keys=("alice-key", "bob-key")), MODEL)
    with serve_app(app, engine) as live, httpx.Client(base_url=live.url, timeout=60) as client:
        assert _cached(client, "alice-key") >= 0
        assert _cached(client, "alice-key") >= 64  # alice's own prompt is cached for alice
        assert _cached(client, "bob-key") == 0  # but bob sees nothing of it
        assert _cached(client, "bob-key") >= 64  # and has his own
        assert _cached(client, "alice-key", salt="other") == 0  # cache_salt splits one key's cache too
