"""Decides each step which sequences run and how many tokens each computes (chunked prefill, FCFS).

New prompts come first (prefill priority, as SGLang and vLLM's V0 scheduler do): when sequences wait,
slots are free and every running sequence is decoding, a step computes only the newly admitted prompts'
first chunks, so their first tokens do not wait for the whole batch's decode; the next step is the
running sequences' (with any admissions left over), so decodes are never skipped twice in a row. On our
kernels a mixed step runs its decodes and its prefill chunks as two forwards anyway, so splitting them
costs little more than one extra sampling.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from llamaserve.config import EngineConfig
from llamaserve.engine.block_manager import BlockManager
from llamaserve.engine.outputs import ScheduledSeq, SchedulerOutput
from llamaserve.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    """First come, first served under a per-step token budget; preempts the youngest by recompute.

    Invariants: every sequence holding KV-cache blocks is in running; waiting sequences hold none.
    """

    def __init__(self, config: EngineConfig, block_manager: BlockManager, max_model_len: int) -> None:
        if block_manager.block_size != config.block_size:
            raise ValueError(
                f"block manager block_size ({block_manager.block_size}) differs from the engine's "
                f"({config.block_size})"
            )
        if max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {max_model_len}")
        self.config = config
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is the youngest
        self.num_preemptions = 0  # over the engine's lifetime
        self._last_was_prefill_only = False  # the previous step skipped the running sequences

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence behind the waiting ones."""
        if seq.status is not SequenceStatus.WAITING or seq.block_table:
            raise ValueError(f"sequence {seq.seq_id} is not a new waiting sequence")
        if seq.num_tokens > self.max_model_len:
            raise ValueError(
                f"the prompt has {seq.num_tokens} tokens, more than the maximum context length "
                f"({self.max_model_len}); shorten the prompt"
            )
        self.waiting.append(seq)

    def add_front(self, seqs: Iterable[Sequence]) -> None:
        """Queue sequences ahead of the waiting ones, keeping their order."""
        self.waiting.extendleft(reversed(list(seqs)))

    def schedule(self) -> SchedulerOutput:
        """Pick this step's work: running sequences first, then waiting ones while budget and blocks last."""
        out = SchedulerOutput()
        # Ahead of decodes only, never of an older prompt still being prefilled (first come, first served
        # among prompts); and only what leaves the running sequences the blocks of their own next step,
        # so a new prompt never causes a running sequence's preemption.
        if (self.config.prefill_priority and self.waiting and self.running
                and not self._last_was_prefill_only and len(self.running) < self.config.max_num_seqs
                and all(s.num_uncomputed_tokens <= 1 for s in self.running)):
            self._admit_waiting(out, self.config.max_batch_tokens, reserve=self._next_step_blocks())
            if out.scheduled:
                self._last_was_prefill_only = True
                return out
        self._last_was_prefill_only = False
        budget = self._schedule_running(out, self.config.max_batch_tokens)
        if not out.preempted:
            self._admit_waiting(out, budget)
        return out

    def _next_step_blocks(self) -> int:
        """Blocks the running sequences lack for a step of theirs (at most the budget each)."""
        budget = self.config.max_batch_tokens
        return sum(self.block_manager.num_missing_blocks(s, min(s.num_uncomputed_tokens, budget))
                   for s in self.running)

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_uncomputed_tokens, budget)
            if num_new == 0:
                i += 1
                continue
            self._check_fits_pool(seq)
            while not self.block_manager.ensure_slots(seq, num_new):
                # The youngest sits at or after index i, so nothing already scheduled is preempted.
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSeq(seq, num_new))
                budget -= num_new
                i += 1
        return budget

    def _admit_waiting(self, out: SchedulerOutput, budget: int, reserve: int = 0) -> None:
        """Admit from the head of waiting while budget, slots and blocks last, leaving `reserve` blocks."""
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            self._check_fits_pool(seq)
            bm.allocate_prompt(seq)
            num_new = min(seq.num_uncomputed_tokens, budget)
            fits = bm.num_missing_blocks(seq, num_new) + reserve <= bm.num_free_blocks
            if not (fits and bm.ensure_slots(seq, num_new)):
                bm.cancel_prompt(seq)
                break  # first come, first served: nobody overtakes the head
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new

    def _check_fits_pool(self, seq: Sequence) -> None:
        # Past this size no amount of preemption helps: fail instead of preempting forever.
        needed = self.block_manager.num_blocks_for(seq.num_tokens)
        if needed > self.block_manager.num_blocks:
            raise RuntimeError(
                f"sequence {seq.seq_id} needs {needed} KV-cache blocks but the pool has only "
                f"{self.block_manager.num_blocks}; finish sequences before they outgrow the pool "
                f"or give the KV cache more memory"
            )

    def _preempt(self, seq: Sequence) -> None:
        """Free the sequence's blocks and send it back to the head of waiting, to be recomputed."""
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_cached_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def on_step_done(self, output: SchedulerOutput) -> None:
        """Record that the scheduled tokens were computed; cache the blocks they completed.

        Call before appending the sampled tokens (ScheduledSeq.samples is read before this call).
        """
        for item in output.scheduled:
            seq = item.seq
            if seq.is_finished:  # aborted while the step ran: its blocks are gone
                continue
            seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.register_computed(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (finished, aborted or failed) and release its blocks; idempotent."""
        if seq.is_finished:
            return
        # By identity: dataclass equality would compare every field.
        if seq.status is SequenceStatus.RUNNING:
            self.running = [s for s in self.running if s is not seq]
        else:
            self.waiting = deque(s for s in self.waiting if s is not seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.free(seq)
