"""`llamaserve serve --replicas 1` as a user runs it: SIGTERM lets the answer in flight finish, refuses
new requests meanwhile, then stops Ray's processes and exits 0. (After test_replicas.py, whose Ray
instance is gone by then: this command starts its own.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_replicas import free_port

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'llamaserve[ray]')")


def test_sigterm_drains_the_replicas_then_exits_0(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llamaserve.cli", "serve", "--replicas", "1", "--port", str(port),
         "--kv-cache-memory", "0.1", "--max-model-len", "1024", "--drain-timeout", "30"],
        stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"RAY_USAGE_STATS_ENABLED": "0"})
    try:
        deadline = time.monotonic() + 180
        while "replicas healthy" not in (tmp_path / "serve.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.5)
        lines: list[str] = []
        started = threading.Event()

        def stream() -> None:
            body = {"messages": [{"role": "user", "content": "Tell a story"}], "max_tokens": 100,
                    "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    lines.append(line)
                    started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(60)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=30)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        reader.join(60)
        assert proc.wait(90) == 0
        events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        reasons = [e["choices"][0]["finish_reason"] for e in events if e.get("choices")]
        assert reasons.count("length") == 1 and "data: [DONE]" in lines  # the whole answer, then the end
        assert len(reasons) >= 100 and not any("error" in e for e in events)
        assert "drained (0 still running" in (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
