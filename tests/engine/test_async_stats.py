"""The engine thread's throughput figure (tokens_per_second, behind Retry-After estimates), kept in O(1) a
step, against the plain definition: the tokens of every step in the last 10 s after the window's first,
over the time since that first step."""

import random
from types import SimpleNamespace

import pytest

from llamaserve.engine import async_engine
from llamaserve.engine.async_engine import AsyncEngine


def _stub_engine() -> SimpleNamespace:
    scheduler = SimpleNamespace(running=[], num_running=0, num_preemptions=0)
    blocks = SimpleNamespace(usage=0.0, prefix_query_tokens=0, prefix_hit_tokens=0, num_free_blocks=8)
    return SimpleNamespace(scheduler=scheduler, block_manager=blocks, num_waiting_seqs=0, num_blocks=8)


def _reference(steps: list[tuple[float, int]], now: float) -> float:
    recent = [(t, n) for t, n in steps if n and now - t < 10.0]
    span = now - recent[0][0] if len(recent) > 1 else 0.0
    return sum(n for _, n in recent[1:]) / span if span > 0 else 0.0


def test_the_rate_matches_its_definition_over_a_random_run(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(7)
    clock = [100.0]
    monkeypatch.setattr(async_engine.time, "monotonic", lambda: clock[0])
    engine = AsyncEngine(_stub_engine())  # type: ignore[arg-type]
    steps: list[tuple[float, int]] = []
    nonzero = 0
    for _ in range(3000):
        clock[0] += rng.choice([0.004, 0.02, 0.3, 2.5, 11.0])  # steps, pauses, and idle gaps past the window
        tokens = rng.choice([0, 1, 16, 64])
        steps.append((clock[0], tokens))
        engine._update_stats(tokens, finished=rng.choice([0, 0, 1]))
        want = _reference(steps, clock[0])
        assert engine.stats.tokens_per_second == pytest.approx(want, rel=1e-9, abs=1e-9)
        nonzero += want > 0
    assert nonzero > 1000  # the comparison covered real rates, not only empty windows


def test_sequences_finished_over_a_minute_ago_leave_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(async_engine.time, "monotonic", lambda: clock[0])
    engine = AsyncEngine(_stub_engine())  # type: ignore[arg-type]
    engine._update_stats(1, finished=2)
    clock[0] = 30.0
    engine._update_stats(1, finished=1)
    assert engine._done_times == [0.0, 0.0, 30.0]
    clock[0] = 61.0
    engine._update_stats(1)  # no finish this step: the expired ones still go
    assert engine._done_times == [30.0]
    clock[0] = 95.0
    engine._update_stats(0)
    assert engine._done_times == []
