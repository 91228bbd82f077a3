"""Typed hand-offs out of the engine: per-step scheduler output and per-request deltas."""

from __future__ import annotations

from dataclasses import dataclass, field

from llamaserve.engine.sequence import Sequence


@dataclass(slots=True)
class ScheduledSeq:
    """A sequence and how many of its uncomputed tokens run through the model this step."""

    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the sequence: its last logits yield a token."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob) of the k most likely alternatives


@dataclass(slots=True)
class CompletionOutput:
    """One of a request's n choices; text and token_ids are the delta since the last output."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it


@dataclass(slots=True)
class RequestOutput:
    """A request's progress after one engine step (deltas, not cumulative)."""

    request_id: str
    outputs: list[CompletionOutput]
    prompt_tokens: int
    completion_tokens: int  # cumulative over all choices
    cached_tokens: int
    finished: bool
    error: str | None = None
