"""benchmarks/health_probe.py: a probe process against a stub server on loopback, told to stop or bounded."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.benchmark_scripts import load_benchmark

health_probe = load_benchmark("health_probe")


class Stub(ThreadingHTTPServer):
    """Answers GET /health with `status(n)` for its n-th request (from 0)."""

    def __init__(self, status: Callable[[int], int]) -> None:
        self.status, self.count = status, 0
        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: Stub

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        code = self.server.status(self.server.count)
        self.server.count += 1
        body = b'{"status": "ok"}'
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stub(request: pytest.FixtureRequest) -> Iterator[Stub]:
    server = Stub(getattr(request, "param", lambda n: 200))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_samples_until_told_to_stop(stub: Stub) -> None:
    with health_probe.HealthProbe(stub.url, interval=0.01) as probe:
        _until(lambda: stub.count >= 5)
    assert probe.proc.poll() is not None  # ended on leaving the block
    seen = stub.count
    time.sleep(0.1)
    assert stub.count == seen
    samples = probe.samples
    assert len(samples.latencies) == seen and samples.failed == 0 and not samples.bounded
    assert 0 < samples.p99_ms() < 5000 and samples.max_ok_ms() > 0


@pytest.mark.parametrize("stub", [lambda n: 200 if n < 2 else 503], indirect=True)
def test_non_200_and_no_answer_are_failed_samples(stub: Stub) -> None:
    with health_probe.HealthProbe(stub.url, interval=0.01, timeout=1.0) as probe:
        _until(lambda: stub.count >= 5)
        stub.shutdown()
        stub.server_close()  # from here the probes are refused
        time.sleep(0.1)
    samples = probe.samples
    assert samples.not_ok == {503: stub.count - 2} and samples.errors >= 1
    assert samples.failed == len(samples.latencies) - 2
    assert sum(math.isinf(x) for x in samples.latencies) == samples.failed
    assert math.isinf(samples.p99_ms())  # over 1 % failed: the target is missed, not the failures dropped


def test_bounded_in_count(stub: Stub) -> None:
    with health_probe.HealthProbe(stub.url, interval=0.01, max_samples=3) as probe:
        _until(lambda: probe.proc.poll() is not None)  # it ends on its own
    assert len(probe.samples.latencies) == 3 and probe.samples.bounded


def test_p99_with_failures_and_loopback_only() -> None:
    ok = health_probe.HealthSamples([0.01] * 1000)
    assert ok.p99_ms() == pytest.approx(10.0)
    few = health_probe.HealthSamples([0.01] * 995 + [math.inf] * 5, errors=5)
    assert few.p99_ms() == pytest.approx(10.0) and few.max_ok_ms() == pytest.approx(10.0)
    assert math.isinf(health_probe.HealthSamples([0.01] * 98 + [math.inf] * 2).p99_ms())
    assert math.isinf(health_probe.HealthSamples([]).p99_ms())
    with pytest.raises(ValueError, match="loopback"):
        health_probe.HealthProbe("http://10.1.2.3:8000")


def test_killed_when_the_load_fails(stub: Stub) -> None:
    with pytest.raises(RuntimeError, match="the load"):
        with health_probe.HealthProbe(stub.url, interval=0.01) as probe:
            raise RuntimeError("the load")
    assert probe.proc.poll() is not None and probe.samples.latencies == []
