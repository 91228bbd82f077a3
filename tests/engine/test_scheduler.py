"""Tests of the scheduler driven by fake step outputs: budget, chunking, prefix hits, preemption."""

from __future__ import annotations

import pytest

from llamaserve.config import EngineConfig
from llamaserve.engine.block_manager import BlockManager
from llamaserve.engine.outputs import SchedulerOutput
from llamaserve.engine.sampling_params import SamplingParams
from llamaserve.engine.scheduler import Scheduler
from llamaserve.engine.sequence import Sequence, SequenceStatus


def make_scheduler(
    num_blocks: int, max_batch_tokens: int = 512, max_num_seqs: int = 64, max_model_len: int = 4096,
    prefill_priority: bool = False,
) -> Scheduler:
    """Mixed steps unless asked (most tests here are about budgets and chunks within one step)."""
    config = EngineConfig(block_size=16, max_batch_tokens=max_batch_tokens, max_num_seqs=max_num_seqs,
                          prefill_priority=prefill_priority)
    return Scheduler(config, BlockManager(num_blocks, 16), max_model_len)


def make_seq(seq_id: int, tokens: list[int], max_tokens: int = 4) -> Sequence:
    return Sequence(seq_id, f"req-{seq_id}", list(tokens), len(tokens), SamplingParams(max_tokens=max_tokens))


def fake_token(seq: Sequence) -> int:
    """A deterministic function of the sequence so far, as greedy decoding would be."""
    return (sum(seq.token_ids) * 31 + seq.num_tokens) % 997 + 3


def step(sched: Scheduler) -> SchedulerOutput:
    """One engine step without a model: schedule, "forward", sample where due, finish at max_tokens."""
    running_before = list(sched.running)
    out = sched.schedule()
    if out.preempted:  # no admission in a step that preempted
        assert all(any(s.seq is r for r in running_before) for s in out.scheduled)
    sampling = [s.seq for s in out.scheduled if s.samples]  # read before on_step_done moves the counts
    sched.on_step_done(out)
    bs = sched.block_manager.block_size
    for s in out.scheduled:
        assert len(s.seq.block_table) * bs >= s.seq.num_computed_tokens  # every computed token has a slot
    for seq in sampling:
        seq.token_ids.append(fake_token(seq))
        if seq.num_output_tokens >= (seq.params.max_tokens or 0):
            sched.finish(seq, "length")
    return out


def run_all(sched: Scheduler, max_steps: int = 500) -> list[SchedulerOutput]:
    outputs = []
    while sched.has_unfinished:
        if len(outputs) == max_steps:
            raise AssertionError("the scheduler made no progress")
        outputs.append(step(sched))
    return outputs


def planned(out: SchedulerOutput) -> list[tuple[int, int]]:
    return [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled]


def first_scheduled(outputs: list[SchedulerOutput], seq: Sequence) -> tuple[int, int]:
    """(step, position in that step) where seq is first scheduled."""
    for i, out in enumerate(outputs):
        for j, s in enumerate(out.scheduled):
            if s.seq is seq:
                return i, j
    raise AssertionError(f"sequence {seq.seq_id} was never scheduled")


def assert_pool_empty(sched: Scheduler) -> None:
    bm = sched.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_admission_stops_at_max_num_seqs() -> None:
    sched = make_scheduler(num_blocks=32, max_num_seqs=2)
    seqs = [make_seq(i, list(range(20))) for i in range(3)]
    for seq in seqs:
        sched.add(seq)
    out = sched.schedule()
    assert planned(out) == [(0, 20), (1, 20)]
    assert [s.status for s in seqs] == [SequenceStatus.RUNNING] * 2 + [SequenceStatus.WAITING]
    assert (sched.num_running, sched.num_waiting) == (2, 1)


def test_admission_stops_at_token_budget_and_chunks_the_last() -> None:
    sched = make_scheduler(num_blocks=32, max_batch_tokens=64)
    for i in range(4):
        sched.add(make_seq(i, list(range(i * 100, i * 100 + 30))))
    out = sched.schedule()
    assert planned(out) == [(0, 30), (1, 30), (2, 4)]
    assert out.num_tokens == 64
    assert [s.samples for s in out.scheduled] == [True, True, False]
    assert sched.num_waiting == 1


def test_chunked_prefill_while_another_sequence_decodes() -> None:
    sched = make_scheduler(num_blocks=32, max_batch_tokens=32)
    a = make_seq(0, list(range(10)), max_tokens=10)
    sched.add(a)
    assert planned(step(sched)) == [(0, 10)]
    b = make_seq(1, list(range(100, 200)), max_tokens=2)
    sched.add(b)
    chunks = []
    for _ in range(4):
        out = step(sched)
        assert planned(out)[0] == (0, 1) and out.scheduled[0].seq is a  # a decodes every step
        chunks.append(out.scheduled[1].num_new_tokens)
        assert b.num_output_tokens == (1 if sum(chunks) == 100 else 0)  # samples on the last chunk only
    assert chunks == [31, 31, 31, 7]
    assert a.num_output_tokens == 5
    run_all(sched)
    assert (a.num_tokens, b.num_tokens) == (20, 102)
    assert_pool_empty(sched)


def test_prefix_hit_through_the_scheduler() -> None:
    sched = make_scheduler(num_blocks=16)
    shared = list(range(1, 49))
    sched.add(make_seq(0, shared + [1000, 1001, 1002, 1003, 1004], max_tokens=3))
    run_all(sched)
    b = make_seq(1, shared + list(range(2000, 2007)))
    sched.add(b)
    out = sched.schedule()
    assert planned(out) == [(1, 7)]
    assert b.num_cached_tokens == 48
    assert sched.block_manager.prefix_hit_tokens == 48


def test_preempts_the_youngest_and_recomputes_it() -> None:
    def workload(num_blocks: int) -> tuple[Scheduler, Sequence, Sequence]:
        sched = make_scheduler(num_blocks=num_blocks, max_batch_tokens=64)
        a = make_seq(0, list(range(24)), max_tokens=20)
        b = make_seq(1, list(range(500, 524)), max_tokens=20)
        sched.add(a)
        sched.add(b)
        return sched, a, b

    roomy, ref_a, ref_b = workload(num_blocks=64)
    run_all(roomy)
    sched, a, b = workload(num_blocks=4)  # two sequences of 2 blocks fill it; a third block is needed
    outputs = run_all(sched)
    preempting = [out for out in outputs if out.preempted]
    assert preempting and all(out.preempted == [b] for out in preempting)
    first = preempting[0]
    assert planned(first) == [(0, 1)]  # no admission in a step that preempted
    assert (a.num_preemptions, b.num_preemptions) == (0, len(preempting))
    assert a.token_ids == ref_a.token_ids and b.token_ids == ref_b.token_ids
    assert b.num_tokens == 44
    assert_pool_empty(sched)


def test_the_youngest_preempts_itself() -> None:
    sched = make_scheduler(num_blocks=4, max_batch_tokens=64, max_num_seqs=2)
    a = make_seq(0, list(range(20)), max_tokens=20)
    b = make_seq(1, list(range(500, 530)), max_tokens=20)
    c = make_seq(2, list(range(700, 710)), max_tokens=3)  # kept waiting by max_num_seqs
    for seq in (a, b, c):
        sched.add(seq)
    for _ in range(10):
        out = step(sched)
        if out.preempted:
            break
    assert out.preempted == [b]
    assert planned(out) == [(0, 1)]  # a was served before b ran out of blocks
    assert list(sched.waiting) == [b, c] and b.status is SequenceStatus.WAITING
    assert b.block_table == [] and b.num_computed_tokens == 0 and b.num_cached_tokens == 0
    outputs = run_all(sched)
    assert first_scheduled(outputs, b) < first_scheduled(outputs, c)  # the preempted b is readmitted first
    assert (a.num_tokens, b.num_tokens, c.num_tokens) == (40, 50, 13)
    assert_pool_empty(sched)


def test_first_come_first_served_when_the_head_does_not_fit() -> None:
    sched = make_scheduler(num_blocks=4)
    a = make_seq(0, list(range(40)), max_tokens=5)
    sched.add(a)
    step(sched)
    big = make_seq(1, list(range(100, 140)))  # 3 blocks; 1 is free
    small = make_seq(2, list(range(200, 205)))  # would fit
    sched.add(big)
    sched.add(small)
    bm = sched.block_manager
    counters = (bm.prefix_queries, bm.prefix_hits)
    out = step(sched)
    assert planned(out) == [(0, 1)]
    assert list(sched.waiting) == [big, small]
    assert big.block_table == [] and big.num_computed_tokens == 0
    assert (bm.prefix_queries, bm.prefix_hits) == counters  # the failed admission left no trace
    outputs = run_all(sched)
    assert first_scheduled(outputs, big) < first_scheduled(outputs, small)
    assert_pool_empty(sched)


def test_a_sequence_larger_than_the_pool_raises_instead_of_looping() -> None:
    sched = make_scheduler(num_blocks=2)
    sched.add(make_seq(0, list(range(40))))
    with pytest.raises(RuntimeError, match="needs 3 KV-cache blocks"):
        sched.schedule()

    sched = make_scheduler(num_blocks=2)
    grower = make_seq(1, list(range(30)), max_tokens=10)
    sched.add(grower)
    with pytest.raises(RuntimeError, match="pool has only 2"):
        for _ in range(20):
            step(sched)
    assert grower.num_tokens == 33


def test_finishing_and_aborting_mixed_sequences_frees_the_pool() -> None:
    sched = make_scheduler(num_blocks=24, max_batch_tokens=64, max_num_seqs=8)
    shared = list(range(1, 33))
    first = make_seq(0, shared + list(range(900, 908)), max_tokens=100)
    sched.add(first)
    step(sched)
    others = [make_seq(i, shared + list(range(i * 100, i * 100 + 70)), max_tokens=100) for i in range(1, 5)]
    for seq in others:
        sched.add(seq)
    step(sched)
    step(sched)
    s1, s2, s3, s4 = others
    assert [s.status for s in others] == [SequenceStatus.RUNNING] * 2 + [SequenceStatus.WAITING] * 2
    assert 0 < s2.num_computed_tokens < s2.num_tokens  # mid prefill
    assert max(b.ref_count for b in sched.block_manager.blocks) == 3  # shared prefix blocks

    sched.finish(first, "stop")
    sched.finish(s2, "abort")
    sched.finish(s4, "abort")
    sched.finish(s1, "length")
    sched.finish(s3, "error")
    sched.finish(s3, "abort")  # idempotent
    assert [s.finish_reason for s in [first, *others]] == ["stop", "length", "abort", "error", "abort"]
    assert all(s.is_finished and s.block_table == [] for s in [first, *others])
    assert not sched.has_unfinished
    assert_pool_empty(sched)
    assert sched.schedule().is_empty


def test_add_front_keeps_order_and_add_validates() -> None:
    sched = make_scheduler(num_blocks=8, max_model_len=64)
    old, x, y = (make_seq(i, [i + 1]) for i in range(3))
    sched.add(old)
    sched.add_front([x, y])
    assert list(sched.waiting) == [x, y, old]
    with pytest.raises(ValueError, match="maximum context length"):
        sched.add(make_seq(9, list(range(65))))


def test_a_sequence_aborted_during_a_step_is_left_alone() -> None:
    sched = make_scheduler(num_blocks=8)
    seq = make_seq(0, list(range(20)))
    sched.add(seq)
    out = sched.schedule()
    sched.finish(seq, "abort")  # e.g. the client disconnected while the model ran
    sched.on_step_done(out)
    assert seq.num_computed_tokens == 0 and seq.block_table == []
    assert_pool_empty(sched)


def test_prefill_priority_gives_a_new_prompt_a_step_of_its_own_then_the_decodes_theirs() -> None:
    sched = make_scheduler(num_blocks=32, max_batch_tokens=32, prefill_priority=True)
    a = make_seq(0, list(range(10)), max_tokens=20)
    sched.add(a)
    assert planned(step(sched)) == [(0, 10)]  # nothing runs yet: an ordinary step
    assert planned(step(sched)) == [(0, 1)]
    sched.add(make_seq(1, list(range(100, 105)), max_tokens=3))
    sched.add(make_seq(2, list(range(200, 205)), max_tokens=3))
    assert planned(step(sched)) == [(1, 5), (2, 5)]  # both prompts at once, before a's decode
    sched.add(make_seq(3, list(range(300, 305)), max_tokens=3))
    # Never two prefill-only steps in a row: d joins the decodes' step.
    assert planned(step(sched)) == [(0, 1), (1, 1), (2, 1), (3, 5)]
    sched.add(make_seq(4, list(range(400, 405)), max_tokens=3))
    assert planned(step(sched)) == [(4, 5)]
    assert planned(step(sched)) == [(0, 1), (1, 1), (2, 1), (3, 1), (4, 1)]
    run_all(sched)
    assert a.num_tokens == 30
    assert_pool_empty(sched)


def test_prefill_priority_never_takes_the_blocks_a_running_decode_needs() -> None:
    # a's prompt fills its 2 blocks exactly, so its first decode needs the pool's third. b would fit in
    # it, and be preempted for a at once: b waits for an ordinary step instead.
    sched = make_scheduler(num_blocks=3, max_batch_tokens=64, prefill_priority=True)
    a = make_seq(0, list(range(32)), max_tokens=4)
    sched.add(a)
    step(sched)
    b = make_seq(1, list(range(100, 110)), max_tokens=2)
    sched.add(b)
    out = step(sched)
    assert planned(out) == [(0, 1)] and not out.preempted
    assert sched.num_waiting == 1 and sched.num_preemptions == 0
    run_all(sched)
    assert sched.num_preemptions == 0
    assert_pool_empty(sched)


def test_prefill_priority_waits_for_a_free_slot() -> None:
    sched = make_scheduler(num_blocks=32, max_num_seqs=1, prefill_priority=True)
    a = make_seq(0, list(range(10)), max_tokens=3)
    sched.add(a)
    step(sched)
    sched.add(make_seq(1, list(range(100, 110)), max_tokens=2))
    assert planned(step(sched)) == [(0, 1)]
    assert planned(step(sched)) == [(0, 1)]  # a finishes here
    assert planned(step(sched)) == [(1, 10)]
    run_all(sched)
    assert_pool_empty(sched)


def test_prefill_priority_does_not_overtake_an_older_prompt_being_prefilled() -> None:
    sched = make_scheduler(num_blocks=32, max_batch_tokens=32, prefill_priority=True)
    a = make_seq(0, list(range(10)), max_tokens=20)
    sched.add(a)
    step(sched)
    b = make_seq(1, list(range(100, 200)), max_tokens=2)
    sched.add(b)
    assert planned(step(sched)) == [(1, 32)]  # b's first chunk ahead of a's decode
    c = make_seq(2, list(range(300, 305)), max_tokens=2)
    sched.add(c)
    assert planned(step(sched)) == [(0, 1), (1, 31)]
    # b is still being prefilled: c takes its turn after b, in ordinary steps, not a step of its own
    assert planned(step(sched)) == [(0, 1), (1, 31)]
    assert planned(step(sched)) == [(0, 1), (1, 6), (2, 5)]
    run_all(sched)
    assert_pool_empty(sched)
