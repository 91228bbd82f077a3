"""`serve --replicas`: two engine replicas of the embedded model behind one Ray Serve endpoint.

One local Ray instance for the module (4 logical CPUs on this 2-core machine: the replicas take 1 each,
the rest is Ray's own), started by the test and shut down after it. Skipped without `ray[serve]`.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llamaserve.config import EngineConfig
from llamaserve.server import replicas
from llamaserve.server.settings import ServerSettings
from tests.e2e.conftest import KEY, MODEL

ray = pytest.importorskip("ray", reason="ray[serve] is not installed (pip install 'llamaserve[ray]')")
serve = pytest.importorskip("ray.serve")
HEADERS = {"Authorization": f"Bearer {KEY}"}
REPLICA = replicas.REPLICA_HEADER
CONFIG = EngineConfig(kv_cache_memory=0.1, max_num_seqs=4, max_model_len=2048)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Deployment:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.settings = ServerSettings(port=self.port, api_keys=(KEY,), drain_timeout=10)

    def deploy(self) -> None:
        plan = replicas.ReplicaPlan(replicas=2, num_cpus=1, health_check_period_s=1)
        replicas.start(plan, CONFIG, self.settings, None, None, MODEL)

    def chat(self, messages: list[dict], **fields: object) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/chat/completions", headers=HEADERS, timeout=120,
                          json={"messages": messages, "max_tokens": 1, "temperature": 0} | fields)

    def replica_ids(self) -> set[str]:
        details = serve.context._get_global_client().get_serve_details()
        deployment = details["applications"][replicas.APP_NAME]["deployments"]["EngineReplica"]
        return {r["replica_id"] for r in deployment["replicas"] if r["state"] == "RUNNING"}


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=100 * 1024**2)
    d = Deployment()
    try:
        d.deploy()
        yield d
    finally:
        serve.shutdown()
        ray.shutdown()


def system(i: int, words: int = 6) -> dict:
    """A system prompt that differs from the others from its first token (its own first block)."""
    return {"role": "system", "content": f"{i} " + " ".join(f"rule{i}-{k}" for k in range(words))}


def test_both_replicas_answer_and_name_themselves(deployment: Deployment) -> None:
    seen = set()
    for i in range(16):
        r = deployment.chat([system(i), {"role": "user", "content": "Hi"}])
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] is not None
        seen.add(r.headers[REPLICA])
    assert seen == deployment.replica_ids() and len(seen) == 2


def test_api_keys_are_enforced_at_the_endpoint_in_each_apis_shape(deployment: Deployment) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    r = httpx.post(f"{deployment.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(f"{deployment.url}/v1/messages", json=body, timeout=60,
                   headers={"x-api-key": "wrong", "anthropic-version": "2023-06-01"})
    assert r.status_code == 401 and r.json()["type"] == "error"
    r = httpx.get(f"{deployment.url}/v1/models", headers=HEADERS, timeout=60)
    assert r.status_code == 200 and r.json()["data"][0]["id"] == MODEL and r.headers[REPLICA]
    # the same refusals as one server: a bad body is the route's own 400, not a proxy error
    r = httpx.post(f"{deployment.url}/v1/chat/completions", headers=HEADERS, json={"messages": []},
                   timeout=60)
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    # a body past --max-body-bytes is refused at the endpoint, in the route's shape
    big = b'{"prompt": "' + b"x" * (deployment.settings.max_body_bytes + 10) + b'"}'
    r = httpx.post(f"{deployment.url}/v1/completions", headers=HEADERS | {"content-type": "application/json"},
                   content=big, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_metrics_report_every_replica_behind_the_key(deployment: Deployment) -> None:
    assert httpx.get(f"{deployment.url}/metrics", timeout=30).status_code == 401
    ids = deployment.replica_ids()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = httpx.get(f"{deployment.url}/metrics", headers=HEADERS, timeout=30).text
        seen = set(re.findall(r'^llamaserve_num_requests_running\{replica="([^"]+)"\} ', text, re.M))
        if seen == ids:
            break
        time.sleep(1)
    assert seen == ids
    families = {f.name for f in text_string_to_metric_families(text)}  # one valid exposition
    assert {"llamaserve_requests", "vllm:num_requests_running", "llamaserve_prefix_cache_hits"} <= families


def hit_rate(deployment: Deployment, offset: int) -> tuple[float, dict[int, set[str]]]:
    """Four long system prompts, three questions each, interleaved: cached / prompt tokens, and where
    each system prompt's requests went."""
    cached = prompt = 0
    where: dict[int, set[str]] = {}
    for q in range(3):
        for i in range(offset, offset + 4):
            r = deployment.chat([system(i, words=60), {"role": "user", "content": f"Question {q}?"}])
            assert r.status_code == 200, r.text
            usage = r.json()["usage"]
            cached += usage["prompt_tokens_details"]["cached_tokens"]
            prompt += usage["prompt_tokens"]
            where.setdefault(i, set()).add(r.headers[REPLICA])
    return cached / prompt, where


def test_prefix_routing_keeps_a_shared_prompt_on_one_replica_and_raises_the_hit_rate(
        deployment: Deployment) -> None:
    on, where = hit_rate(deployment, 100)
    assert all(len(r) == 1 for r in where.values()), where  # each system prompt stayed on one replica
    engines = deployment.replica_ids()
    ingress = serve.get_deployment_handle("Ingress", app_name=replicas.APP_NAME)
    ingress.reconfigure.remote({"prefix_routing": False}).result()  # what its user_config sets
    try:
        off, where_off = hit_rate(deployment, 200)
    finally:
        ingress.reconfigure.remote({"prefix_routing": True}).result()
    assert deployment.replica_ids() == engines  # the same engines served both halves
    print(f"prefix-cache hit rate: {on:.2f} with prefix routing, {off:.2f} without; without: {where_off}")
    assert on > off


def test_a_replica_killed_mid_stream_ends_that_stream_and_the_deployment_recovers(
        deployment: Deployment) -> None:
    before = deployment.replica_ids()
    body = {"messages": [system(7), {"role": "user", "content": "Tell a long story."}], "max_tokens": 1500,
            "ignore_eos": True, "stream": True}
    start = time.monotonic()
    lines: list[str] = []
    failed = None
    with httpx.stream("POST", f"{deployment.url}/v1/chat/completions", headers=HEADERS, json=body,
                      timeout=60) as r:
        assert r.status_code == 200
        victim = r.headers[REPLICA]
        try:
            for line in r.iter_lines():
                lines.append(line)
                if len(lines) == 6:  # a few tokens in: kill the replica serving it
                    name = f"SERVE_REPLICA::{replicas.APP_NAME}#EngineReplica#{victim}"
                    ray.kill(ray.get_actor(name, namespace="serve"))
        except httpx.HTTPError as e:  # a cut connection is an acceptable ending too; a hang is not
            failed = e
    assert time.monotonic() - start < 60
    events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    finished = [e for e in events if e.get("choices") and e["choices"][0].get("finish_reason")]
    assert not finished  # it did not pretend to finish
    assert failed is not None or any("error" in e for e in events), lines[-3:]
    # the others go on; the controller replaces the dead replica
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ids = deployment.replica_ids()
        if len(ids) == 2 and victim not in ids:
            break
        time.sleep(1)
    assert len(ids) == 2 and victim not in ids and ids - before
    for i in range(8):
        assert deployment.chat([system(300 + i), {"role": "user", "content": "Hi"}]).status_code == 200
