"""GET /health every 50 ms from a process of its own: a load generator's scheduling is not in its samples.

    with HealthProbe("http://127.0.0.1:8000") as probe:
        ...  # the load
    probe.samples.p99_ms()

The child (this file run as a script) probes until its stdin closes, or until its bounds in time and count,
then writes its samples as one JSON line on stdout. A probe that gets no 200 is a failed sample: it counts
as infinitely slow, so it fails any latency target, and it is counted by status or as an error.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import os
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

READY = "ready"  # the child's first stdout line, written after its first probe


@dataclass
class HealthSamples:
    latencies: list[float]  # seconds, one per probe in order; inf where the probe got no 200
    not_ok: dict[int, int] = field(default_factory=dict)  # answers other than 200, by status
    errors: int = 0  # probes with no answer: refused, reset or timed out
    bounded: bool = False  # the child stopped at its bound in time or count, not when told

    @property
    def failed(self) -> int:
        return sum(self.not_ok.values()) + self.errors

    def p99_ms(self) -> float:
        """p99 in ms, linear between closest ranks; inf when over 1 % of the probes failed (or none ran)."""
        xs = sorted(self.latencies)
        if not xs:
            return math.inf
        k = (len(xs) - 1) * 0.99
        lo = math.floor(k)
        hi = min(lo + 1, len(xs) - 1)
        if k == lo or xs[hi] == xs[lo]:  # no interpolation, so no inf - inf or inf * 0
            return xs[lo] * 1000
        return (xs[lo] + (xs[hi] - xs[lo]) * (k - lo)) * 1000

    def max_ok_ms(self) -> float:
        """The slowest 200, in ms (0 without any)."""
        return max((x for x in self.latencies if math.isfinite(x)), default=0.0) * 1000


def _probe(url: str, interval: float, max_seconds: float, max_samples: int, timeout: float) -> None:
    """The child: probe until stdin closes or a bound is reached; the samples as JSON on stdout."""
    import httpx  # here, so that the parent's import of this module stays cheap

    stop = threading.Event()

    def wait_for_eof() -> None:
        while os.read(0, 4096):  # os.read, not sys.stdin: no buffer lock left held at exit if bounded
            pass
        stop.set()

    threading.Thread(target=wait_for_eof, daemon=True).start()
    samples: list[tuple[float, int]] = []  # (seconds, status); status 0: no answer
    deadline = time.monotonic() + max_seconds
    with httpx.Client(base_url=url, timeout=timeout) as client:
        while not stop.is_set() and len(samples) < max_samples and time.monotonic() < deadline:
            start = time.perf_counter()
            try:
                status = client.get("/health").status_code
            except httpx.HTTPError:
                status = 0
            samples.append((time.perf_counter() - start, status))
            if len(samples) == 1:
                print(READY, flush=True)
            stop.wait(interval)  # from an answer to the next probe: not a fixed rate
    print(json.dumps({"samples": samples, "bounded": not stop.is_set()}), flush=True)


def _loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"the probe is for loopback servers only, not {url}")


class HealthProbe:
    """The probe process from `__enter__` (which returns after its first probe) to `__exit__`, which
    stops it, reads its samples into `.samples` and kills it if it has not ended."""

    def __init__(self, url: str, interval: float = 0.05, max_seconds: float = 3600.0,
                 max_samples: int = 72_000, timeout: float = 5.0) -> None:
        _loopback(url)
        self.command = [sys.executable, str(Path(__file__).resolve()), url, "--interval", str(interval),
                        "--max-seconds", str(max_seconds), "--max-samples", str(max_samples),
                        "--timeout", str(timeout)]
        self.timeout = timeout
        self.samples = HealthSamples([])
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> HealthProbe:
        # unbuffered: readline takes the ready line alone, leaving the rest to communicate()
        self.proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        try:
            assert self.proc.stdout is not None
            ready, _, _ = select.select([self.proc.stdout], [], [], 30 + self.timeout)
            line = self.proc.stdout.readline().decode().strip() if ready else ""
            if line != READY:
                raise RuntimeError(f"the /health probe did not start (got {line!r})")
        except BaseException:
            self._kill()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if kind is None:
                self.samples = self._collect()
        finally:
            self._kill()

    def _collect(self) -> HealthSamples:
        assert self.proc is not None
        out, _ = self.proc.communicate(timeout=30 + self.timeout)  # closes stdin: the child's signal to stop
        if self.proc.returncode != 0 or not out.strip():
            raise RuntimeError(f"the /health probe failed (exit status {self.proc.returncode})")
        report = json.loads(out.decode().splitlines()[-1])
        samples = HealthSamples([], bounded=report["bounded"])
        for seconds, status in report["samples"]:
            samples.latencies.append(seconds if status == 200 else math.inf)
            if status == 0:
                samples.errors += 1
            elif status != 200:
                samples.not_ok[status] = samples.not_ok.get(status, 0) + 1
        return samples

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url")
    ap.add_argument("--interval", type=float, default=0.05)
    ap.add_argument("--max-seconds", type=float, default=3600.0)
    ap.add_argument("--max-samples", type=int, default=72_000)
    ap.add_argument("--timeout", type=float, default=5.0)
    args = ap.parse_args()
    _loopback(args.url)
    _probe(args.url, args.interval, args.max_seconds, args.max_samples, args.timeout)


if __name__ == "__main__":
    main()
