"""Bookkeeping of the paged KV-cache pool: block ref counts, an LRU free queue and the prefix cache."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from llamaserve.engine.sequence import Sequence


@dataclass(slots=True)
class Block:
    """One block of block_size KV slots.

    hash is the chain digest of the block's tokens once it is full and computed; the block is reusable
    as a prefix-cache hit only while the cache map points at it (a duplicate keeps its hash, unmapped).
    """

    block_id: int
    ref_count: int = 0
    hash: bytes | None = None
    tokens: tuple[int, ...] = ()  # the tokens behind hash, compared on lookup as well


def chain_hash(parent: bytes, tokens: tuple[int, ...]) -> bytes:
    """Digest of a full block: blake2b over the previous block's digest and this block's tokens.

    The first block's parent is the sequence's salt digest (salt_digest), so two tenants with different
    salts never share, or learn of, each other's cached blocks.
    """
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


def salt_digest(salt: str | None) -> bytes:
    """The root of a sequence's block chain: one value for no salt, a digest of the salt otherwise."""
    if salt is None:
        return b""
    return hashlib.blake2b(salt.encode(), digest_size=16, person=b"llamaserve-salt").digest()


class BlockManager:
    """Owns which KV-cache blocks each sequence holds and which computed blocks can be shared.

    Invariants: a block is in the free queue iff its ref_count is 0; the cache map holds one block
    per hash; a block with ref_count > 1 is full and computed, so it is never written again.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got num_blocks={num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Head: next to be allocated (least recently freed); tail: most recently freed.
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[bytes, int] = {}  # chain digest -> block id
        self.prefix_queries = 0  # full prompt blocks looked up in the prefix cache
        self.prefix_hits = 0  # of which found

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by at least one sequence."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def prefix_query_tokens(self) -> int:
        return self.prefix_queries * self.block_size

    @property
    def prefix_hit_tokens(self) -> int:
        return self.prefix_hits * self.block_size

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def _block_tokens(self, seq: Sequence, i: int) -> tuple[int, ...]:
        return tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])

    def allocate_prompt(self, seq: Sequence) -> int:
        """Give a sequence without blocks the longest cached chain of its leading full blocks.

        At most (num_tokens - 1) // block_size blocks are taken, so the last token is always
        computed, in a block of its own. Returns the number of cached tokens.
        """
        if seq.block_table:
            raise ValueError(f"sequence {seq.seq_id} already holds KV-cache blocks")
        max_hits = (seq.num_tokens - 1) // self.block_size
        parent = salt_digest(seq.params.cache_salt)
        for i in range(max_hits):
            tokens = self._block_tokens(seq, i)
            h = chain_hash(parent, tokens)
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].tokens != tokens:
                break
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_queue[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            parent = h
        hits = len(seq.block_table)
        self.prefix_queries += max_hits
        self.prefix_hits += hits
        seq.num_hashed_blocks = hits
        seq.num_computed_tokens = seq.num_cached_tokens = hits * self.block_size
        return seq.num_cached_tokens

    def cancel_prompt(self, seq: Sequence) -> None:
        """Undo allocate_prompt (and its counters) for a sequence that could not be admitted after all.

        Call right after allocate_prompt and a failed ensure_slots, before anything else changed.
        """
        self.prefix_queries -= (seq.num_tokens - 1) // self.block_size
        self.prefix_hits -= len(seq.block_table)
        self.free(seq)
        seq.num_computed_tokens = seq.num_cached_tokens = 0

    def num_missing_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks seq lacks to compute num_new_tokens more tokens."""
        needed = self.num_blocks_for(seq.num_computed_tokens + num_new_tokens)
        return max(0, needed - len(seq.block_table))

    def can_fit(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether the free blocks suffice to compute num_new_tokens more tokens of seq."""
        return self.num_missing_blocks(seq, num_new_tokens) <= self.num_free_blocks

    def ensure_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow seq.block_table to hold num_new_tokens more tokens; all or nothing."""
        missing = self.num_missing_blocks(seq, num_new_tokens)
        if missing > self.num_free_blocks:
            return False
        for _ in range(missing):
            seq.block_table.append(self._pop_free())
        return True

    def _pop_free(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:
            # Evict: the slots are about to be overwritten.
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash = None
            block.tokens = ()
        block.ref_count = 1
        return block_id

    def register_computed(self, seq: Sequence) -> None:
        """Enter the sequence's newly full and computed blocks into the prefix cache."""
        num_full = min(len(seq.block_table), seq.num_computed_tokens // self.block_size)
        if num_full <= seq.num_hashed_blocks:
            return
        parent = salt_digest(seq.params.cache_salt)
        if seq.num_hashed_blocks > 0:
            previous = self.blocks[seq.block_table[seq.num_hashed_blocks - 1]].hash
            if previous is None:
                raise RuntimeError(f"sequence {seq.seq_id}: a hashed block has lost its digest")
            parent = previous
        for i in range(seq.num_hashed_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            block.tokens = self._block_tokens(seq, i)
            block.hash = parent = chain_hash(parent, block.tokens)
            # An equal block cached earlier keeps the mapping; this one stays unmapped.
            self.cached.setdefault(block.hash, block.block_id)
        seq.num_hashed_blocks = num_full

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references, tail first, so its tail is evicted before its head."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            if block.ref_count < 1:
                raise RuntimeError(f"block {block_id} freed more often than allocated")
            block.ref_count -= 1
            if block.ref_count > 0:
                continue
            self.free_queue[block_id] = None
            if block.hash is None or self.cached.get(block.hash) != block_id:
                # Nothing to reuse in it: hand it out before any cached block.
                self.free_queue.move_to_end(block_id, last=False)
        seq.block_table.clear()
        seq.num_hashed_blocks = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (e.g. after new weights are loaded)."""
        self.cached.clear()
        for block in self.blocks:
            if block.ref_count == 0:
                block.hash = None
                block.tokens = ()
