"""Tests of the KV-cache block manager: allocation, prefix caching, LRU eviction (no torch)."""

from __future__ import annotations

import pytest

from llamaserve.engine.block_manager import BlockManager, chain_hash, salt_digest
from llamaserve.engine.sampling_params import SamplingParams
from llamaserve.engine.sequence import Sequence


def make_seq(seq_id: int, tokens: list[int], salt: str | None = None) -> Sequence:
    return Sequence(seq_id, f"req-{seq_id}", list(tokens), len(tokens), SamplingParams(cache_salt=salt))


def compute_all(bm: BlockManager, seq: Sequence) -> None:
    """What a step does for a sequence: slots for every uncomputed token, then registration."""
    assert bm.ensure_slots(seq, seq.num_uncomputed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.register_computed(seq)


def snapshot(bm: BlockManager) -> tuple[list[int], list[int], dict[bytes, int]]:
    return list(bm.free_queue), [b.ref_count for b in bm.blocks], dict(bm.cached)


def test_allocate_register_free_roundtrip() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(100, 110))
    seq = make_seq(0, tokens)
    assert bm.allocate_prompt(seq) == 0
    assert (bm.prefix_queries, bm.prefix_hits) == (2, 0)  # (10 - 1) // 4 full blocks looked up
    assert bm.ensure_slots(seq, 10)
    assert seq.block_table == [0, 1, 2]
    assert bm.num_free_blocks == 5
    assert bm.usage == pytest.approx(3 / 8)

    seq.num_computed_tokens = 10
    bm.register_computed(seq)
    h0 = chain_hash(salt_digest(None), tuple(tokens[:4]))
    h1 = chain_hash(h0, tuple(tokens[4:8]))
    assert seq.num_hashed_blocks == 2  # the third block is partial
    assert [bm.blocks[i].hash for i in range(3)] == [h0, h1, None]
    assert bm.cached == {h0: 0, h1: 1}

    bm.free(seq)
    assert seq.block_table == [] and seq.num_hashed_blocks == 0
    assert bm.num_free_blocks == 8 and bm.usage == 0.0
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert bm.cached == {h0: 0, h1: 1}  # freed blocks stay reusable


def test_register_is_incremental_over_chunks_and_decode() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(0, list(range(10)))
    bm.allocate_prompt(seq)
    assert bm.ensure_slots(seq, 6)
    seq.num_computed_tokens = 6
    bm.register_computed(seq)
    assert seq.num_hashed_blocks == 1
    assert bm.ensure_slots(seq, 4)
    seq.num_computed_tokens = 10
    bm.register_computed(seq)
    assert seq.num_hashed_blocks == 2
    # Decoding: generated tokens fill block 2, which gets cached once computed.
    seq.token_ids += [50, 51]
    assert bm.ensure_slots(seq, 2)
    bm.register_computed(seq)
    assert seq.num_hashed_blocks == 2  # appended but not computed yet
    seq.num_computed_tokens = 12
    bm.register_computed(seq)
    expected = salt_digest(None)
    for i in range(3):
        expected = chain_hash(expected, tuple(seq.token_ids[4 * i : 4 * i + 4]))
    assert seq.num_hashed_blocks == 3
    assert bm.blocks[seq.block_table[2]].hash == expected
    assert bm.cached[expected] == seq.block_table[2]


def test_prefix_hit_shares_three_blocks() -> None:
    bm = BlockManager(num_blocks=16, block_size=16)
    shared = list(range(1, 49))
    a = make_seq(0, shared + [1000, 1001, 1002, 1003, 1004])
    bm.allocate_prompt(a)
    compute_all(bm, a)

    b = make_seq(1, shared + list(range(2000, 2007)))
    assert bm.allocate_prompt(b) == 48
    assert b.num_cached_tokens == 48 and b.num_computed_tokens == 48 and b.num_hashed_blocks == 3
    assert b.block_table == a.block_table[:3]
    assert [bm.blocks[i].ref_count for i in b.block_table] == [2, 2, 2]
    assert (bm.prefix_queries, bm.prefix_hits) == (6, 3)
    assert (bm.prefix_query_tokens, bm.prefix_hit_tokens) == (96, 48)

    free_before = bm.num_free_blocks
    assert bm.ensure_slots(b, b.num_uncomputed_tokens)
    assert len(b.block_table) == 4 and b.block_table[3] not in a.block_table
    assert bm.num_free_blocks == free_before - 1


def test_hits_on_freed_blocks_leave_the_free_queue() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(0, list(range(9)))
    bm.allocate_prompt(a)
    compute_all(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 8
    b = make_seq(1, list(range(9)))
    assert bm.allocate_prompt(b) == 8
    assert bm.num_free_blocks == 6
    assert all(bm.blocks[i].ref_count == 1 and i not in bm.free_queue for i in b.block_table)


def test_last_token_is_always_computed() -> None:
    bm = BlockManager(num_blocks=8, block_size=16)
    prompt = list(range(32))  # exactly two blocks
    a = make_seq(0, prompt)
    bm.allocate_prompt(a)
    compute_all(bm, a)
    assert len(bm.cached) == 2

    b = make_seq(1, prompt)
    assert bm.allocate_prompt(b) == 16  # only one of the two cached blocks is taken
    assert b.block_table == a.block_table[:1]
    assert (bm.prefix_queries, bm.prefix_hits) == (1 + 1, 1)
    assert bm.ensure_slots(b, b.num_uncomputed_tokens)
    assert b.block_table[1] != a.block_table[1]  # the last token gets a block of its own


def test_lru_eviction_order() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a_tokens = list(range(1, 9))
    a = make_seq(0, a_tokens)
    bm.allocate_prompt(a)
    compute_all(bm, a)
    assert a.block_table == [0, 1]
    bm.free(a)
    assert list(bm.free_queue) == [2, 3, 1, 0]  # older free blocks first; a's tail before its head

    def probe() -> int:
        seq = make_seq(99, a_tokens + [9])
        hit = bm.allocate_prompt(seq)
        bm.free(seq)
        return hit

    b = make_seq(1, list(range(50, 58)))
    bm.allocate_prompt(b)
    assert bm.ensure_slots(b, 8)
    assert b.block_table == [2, 3]
    assert probe() == 8  # a's cached blocks survived

    c = make_seq(2, list(range(60, 64)))
    bm.allocate_prompt(c)
    assert bm.ensure_slots(c, 4)
    assert c.block_table == [1]  # a's tail is evicted first
    assert bm.blocks[1].hash is None and len(bm.cached) == 1
    assert probe() == 4

    d = make_seq(3, list(range(70, 74)))
    bm.allocate_prompt(d)
    assert bm.ensure_slots(d, 4)
    assert d.block_table == [0]
    assert bm.cached == {} and probe() == 0


def test_unmapped_free_blocks_are_reused_before_cached_ones() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq(0, list(range(6)))
    bm.allocate_prompt(a)
    compute_all(bm, a)  # block 0 cached, block 1 partial
    bm.free(a)
    assert list(bm.free_queue) == [1, 2, 3, 0]


def test_ensure_slots_failure_changes_nothing() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq(0, list(range(8)))
    bm.allocate_prompt(a)
    compute_all(bm, a)
    b = make_seq(1, list(range(20, 32)))
    bm.allocate_prompt(b)
    before = snapshot(bm)
    assert not bm.can_fit(b, 12)
    assert not bm.ensure_slots(b, 12)  # needs 3 blocks, 2 are free
    assert snapshot(bm) == before and b.block_table == []
    assert not bm.ensure_slots(a, 9)  # 17 tokens need 5 blocks
    assert snapshot(bm) == before and a.block_table == [0, 1]
    assert bm.can_fit(b, 8) and bm.ensure_slots(b, 8)
    assert bm.num_free_blocks == 0


def test_duplicate_block_keeps_first_mapping_and_the_chain_continues() -> None:
    bm = BlockManager(num_blocks=12, block_size=4)
    common = list(range(8))
    a = make_seq(0, common + [100])
    b = make_seq(1, common + [50, 51, 52, 53, 54])
    for seq in (a, b):  # admitted together: neither hits, both compute the common blocks
        assert bm.allocate_prompt(seq) == 0
    compute_all(bm, a)
    compute_all(bm, b)
    h0 = chain_hash(salt_digest(None), tuple(common[:4]))
    assert bm.cached[h0] == a.block_table[0]
    assert bm.blocks[b.block_table[0]].hash == h0  # unmapped duplicate
    assert b.num_hashed_blocks == 3
    assert len(bm.cached) == 3  # a's two blocks and b's third

    b0, b1, b2, b3 = b.block_table
    bm.free(b)
    queue = list(bm.free_queue)
    assert queue[:3] == [b0, b1, b3] and queue[-1] == b2  # only the mapped block waits at the tail
    c = make_seq(2, common + [50, 51, 52, 53, 99])
    assert bm.allocate_prompt(c) == 12  # a's two blocks, then b's third, chained through b's copy
    assert c.block_table == a.block_table[:2] + [b2]


def test_cancel_prompt_restores_pool_and_counters() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq(0, list(range(9)))
    bm.allocate_prompt(a)
    compute_all(bm, a)
    bm.free(a)
    before = snapshot(bm)
    counters = (bm.prefix_queries, bm.prefix_hits)
    b = make_seq(1, list(range(9)))
    assert bm.allocate_prompt(b) == 8
    bm.cancel_prompt(b)
    assert (bm.prefix_queries, bm.prefix_hits) == counters
    assert b.block_table == [] and b.num_computed_tokens == 0 and b.num_cached_tokens == 0
    assert sorted(snapshot(bm)[0]) == sorted(before[0]) and snapshot(bm)[1:] == before[1:]


def test_allocate_prompt_rejects_a_sequence_holding_blocks() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq(0, list(range(6)))
    bm.allocate_prompt(a)
    assert bm.ensure_slots(a, 6)
    with pytest.raises(ValueError, match="already holds"):
        bm.allocate_prompt(a)


def test_reset_prefix_cache_forgets_free_blocks() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq(0, list(range(9)))
    bm.allocate_prompt(a)
    compute_all(bm, a)
    bm.free(a)
    bm.reset_prefix_cache()
    assert bm.cached == {} and all(b.hash is None for b in bm.blocks)
    assert bm.allocate_prompt(make_seq(1, list(range(9)))) == 0


def test_rejects_empty_pool() -> None:
    with pytest.raises(ValueError, match="at least one block"):
        BlockManager(num_blocks=0, block_size=16)


def test_different_salts_never_share_blocks_equal_salts_do() -> None:
    """One tenant's cached prompt is invisible to another: no hit, so cached_tokens and TTFT tell nothing."""
    bm = BlockManager(num_blocks=16, block_size=4)
    tokens = list(range(1, 14))
    first = make_seq(0, tokens, salt="key-0")
    bm.allocate_prompt(first)
    compute_all(bm, first)
    assert bm.allocate_prompt(make_seq(1, tokens, salt="key-1")) == 0
    assert bm.allocate_prompt(make_seq(2, tokens)) == 0  # unsalted is a tenant of its own too
    assert bm.allocate_prompt(make_seq(3, tokens, salt="key-0")) == 12


def test_digests_are_cryptographic_and_chained() -> None:
    a, b = chain_hash(b"", (1, 2, 3, 4)), chain_hash(b"", (1, 2, 3, 5))
    assert len(a) == 16 and a != b
    assert chain_hash(a, (9, 9, 9, 9)) != chain_hash(b, (9, 9, 9, 9))  # the parent is part of the digest
    assert salt_digest("x") != salt_digest("y") and salt_digest(None) == b""
    # Python's hash() of a tuple of small ints collides in structured ways; a 128-bit digest does not
    assert len({chain_hash(b"", (i, j)) for i in range(100) for j in range(100)}) == 10_000
