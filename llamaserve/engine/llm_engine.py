"""The synchronous engine: add requests, then step() = schedule, forward, sample, update, detokenize."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from llamaserve.config import EngineConfig
from llamaserve.engine.block_manager import BlockManager
from llamaserve.engine.detokenizer import IncrementalDetokenizer
from llamaserve.engine.model_runner import ModelRunner, plan_kv_cache
from llamaserve.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from llamaserve.engine.sampler import Sampler
from llamaserve.engine.sampling_params import SamplingParams
from llamaserve.engine.scheduler import Scheduler
from llamaserve.engine.sequence import Sequence
from llamaserve.engine.structured import Grammar, GrammarCompiler, GrammarState
from llamaserve.loader.tokenizer import Tokenizer
from llamaserve.model.llama import Transformer

if TYPE_CHECKING:
    from llamaserve.loader.weights import ModelSource

log = logging.getLogger("llamaserve.engine")


@dataclass(slots=True)
class _Request:
    """Engine-side state of one request: its n sequences and their detokenizers."""

    request_id: str
    params: SamplingParams
    seqs: list[Sequence]
    detoks: list[IncrementalDetokenizer]
    pending: list[Sequence] = field(default_factory=list)  # siblings admitted once the prompt is cached
    arrival: float = 0.0

    @property
    def finished(self) -> bool:
        return not self.pending and all(s.is_finished for s in self.seqs)


class LLMEngine:
    @classmethod
    def from_model(
        cls, model: str | None, config: EngineConfig, chat_template: str | None = None, progress: bool = False
    ) -> LLMEngine:
        """Load a model by name or path (GGUF file or HF folder) and build an engine around it."""
        from pathlib import Path

        from llamaserve.loader.tokenizer import load_tokenizer
        from llamaserve.loader.weights import load_model
        from llamaserve.sysmem import return_freed_memory

        net, source = load_model(model, config.dtype, default_device(config.device), progress=progress,
                                 quantization=config.quantization)
        template = Path(chat_template) if chat_template else None
        tokenizer = load_tokenizer(source.path, template, source.metadata)
        return_freed_memory()  # building the tokenizer left ~85 MB of freed heap in RSS (32k vocabulary)
        engine = cls(net, tokenizer, config)
        engine.source = source
        return engine

    def __init__(self, model: Transformer, tokenizer: Tokenizer, config: EngineConfig) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.model_config = model.config
        self.max_model_len = config.max_model_len or model.config.max_position_embeddings
        self.kv_plan = plan_kv_cache(model, config, self.max_model_len)
        self.num_blocks = self.kv_plan.num_blocks
        log.info("%s", self.kv_plan.describe())
        self.runner = ModelRunner(model, config, self.num_blocks, self.kv_plan.dtype)
        self.block_manager = BlockManager(self.num_blocks, config.block_size)
        self.scheduler = Scheduler(config, self.block_manager, self.max_model_len)
        self.grammars = GrammarCompiler(tokenizer.hf, tokenizer.vocab_size, tokenizer.eos_token_ids)
        self.sampler = Sampler(model.config.vocab_size, tokenizer.eos_token_ids, seed=config.seed,
                               grammars=self.grammars)
        self.requests: dict[str, _Request] = {}
        self._seq_ids = itertools.count()
        self.num_steps = 0
        self.num_pending_siblings = 0  # sequences of n > 1 requests that wait for their prompt's blocks
        self.source: ModelSource | None = None  # when built by from_model

    # -- requests -------------------------------------------------------------------------------
    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Validate a request; return its effective max_tokens. Raises ValueError with the numbers."""
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        params.check_vocab(self.model_config.vocab_size)
        if any(not 0 <= t < self.model_config.vocab_size for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in 0..{self.model_config.vocab_size - 1}")
        # What one sequence can ever hold: the context length, or a smaller pool given in GB (auto sizing
        # holds at least one full context). Without max_tokens a request may run to that limit: it is
        # admitted whatever is free right now (the scheduler preempts and recomputes when the pool runs
        # out), and stops with finish_reason "length" there.
        capacity = self.num_blocks * self.config.block_size
        limit = min(self.max_model_len, capacity)
        max_tokens = params.max_tokens
        if max_tokens is None:
            if n < limit:
                return limit - n
            what = (f"the context length ({self.max_model_len})" if limit == self.max_model_len
                    else f"the KV cache ({capacity} tokens; raise --kv-cache-memory)")
            raise ValueError(f"the prompt has {n} tokens and leaves no room to generate within {what}")
        if n + max_tokens > self.max_model_len:
            raise ValueError(
                f"this model's context length is {self.max_model_len} tokens, but the prompt has {n} "
                f"tokens and max_tokens is {max_tokens} ({n + max_tokens} in total); "
                "shorten the prompt or lower max_tokens"
            )
        if n + max_tokens > capacity:
            raise ValueError(
                f"prompt ({n} tokens) plus max_tokens ({max_tokens}) exceed the KV cache ({capacity} "
                "tokens); raise --kv-cache-memory or lower max_tokens"
            )
        return max_tokens

    @property
    def num_waiting_seqs(self) -> int:
        """Sequences accepted but not running: in the scheduler's queue or waiting for a sibling's prompt."""
        return self.scheduler.num_waiting + self.num_pending_siblings

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    grammar: Grammar | None = None) -> None:
        """Queue a request; `grammar` is params.structured compiled (compiled here when not given)."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        # Our own copy, with the effective max_tokens: the caller's params stay as they were.
        params = dataclasses.replace(params, max_tokens=self.check_request(prompt_token_ids, params))
        if params.structured is not None and grammar is None:
            grammar = self.grammars.compile(params.structured)
        now = time.monotonic()
        seqs = [
            Sequence(next(self._seq_ids), request_id, list(prompt_token_ids), len(prompt_token_ids),
                     params, index=i, arrival=now, grammar=None if grammar is None else grammar.start())
            for i in range(params.n)
        ]
        detoks = [
            IncrementalDetokenizer(self.tokenizer.hf, prompt_token_ids, params.stop,
                                   include_stop_str_in_output=params.include_stop_str_in_output)
            for _ in seqs
        ]
        self.scheduler.add(seqs[0])
        self.requests[request_id] = _Request(request_id, params, seqs, detoks, seqs[1:], now)
        self.num_pending_siblings += len(seqs) - 1

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final (empty) output."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self.num_pending_siblings -= len(req.pending)
        req.pending.clear()
        outs = []
        for seq in req.seqs:
            if not seq.is_finished:
                self._finish(seq, "abort")
                outs.append(CompletionOutput(seq.index, "", [], None, "abort"))
        return self._output(req, outs)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    # -- the step loop --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One iteration: schedule, forward, sample, update sequences, detokenize."""
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        logits = self.runner.execute(sched)
        sampling = [item.seq for item in sched.scheduled if item.samples]
        sampled = self.sampler.sample(logits, sampling) if sampling else None
        self.scheduler.on_step_done(sched)
        self.num_steps += 1
        deltas: dict[str, list[CompletionOutput]] = {}
        if sampled is not None:
            for seq, token, logprob in zip(sampling, sampled.token_ids, sampled.logprobs, strict=True):
                deltas.setdefault(seq.request_id, []).append(self._append(seq, token, logprob))
        outputs = [self._output(self.requests[rid], outs) for rid, outs in deltas.items()]
        for out in outputs:
            if out.finished:
                del self.requests[out.request_id]
        return outputs

    def fail_all(self, message: str) -> list[RequestOutput]:
        """After an engine failure: finish every request with an error instead of hanging it."""
        outputs = []
        for rid in list(self.requests):
            out = self.abort_request(rid)
            if out is not None:
                out.error = message
                for c in out.outputs:
                    c.finish_reason = "error"
                outputs.append(out)
        return outputs

    # -- internals ------------------------------------------------------------------------------
    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> CompletionOutput:
        req = self.requests[seq.request_id]
        seq.token_ids.append(token)
        params = seq.params
        if seq.index == 0 and req.pending:  # the prompt is cached now: the siblings reuse its blocks
            self.scheduler.add_front(req.pending)
            self.num_pending_siblings -= len(req.pending)
            req.pending = []
        detok = req.detoks[seq.index]
        text = detok.add([token])
        reason: str | None = None
        stop_reason: str | int | None = None
        if detok.stop_reason is not None:
            reason, stop_reason = "stop", detok.stop_reason
        elif token in params.stop_token_ids:
            reason, stop_reason = "stop", token
        elif token in self.tokenizer.eos_token_ids and not params.ignore_eos:
            reason = "stop"
        elif seq.grammar is not None and self._grammar_done(seq, seq.grammar, token):
            reason = "stop"
        elif seq.num_output_tokens >= (params.max_tokens or 0) or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            if detok.stop_reason is None:
                text += detok.flush()
            self._finish(seq, reason)
        return CompletionOutput(seq.index, text, [token], None if logprob is None else [logprob],
                                reason, stop_reason)

    @staticmethod
    def _grammar_done(seq: Sequence, grammar: GrammarState, token: int) -> bool:
        """Advance the sequence's grammar by `token`; True once the grammar is complete."""
        if not grammar.accept(token):  # the mask allowed it, so only a grammar engine bug gets here
            log.warning("request %s: grammar refused token %d: %s", seq.request_id, token, grammar.error)
            return True
        return grammar.done

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        self.sampler.forget(seq.seq_id)

    def _output(self, req: _Request, outs: list[CompletionOutput]) -> RequestOutput:
        first = req.seqs[0]
        return RequestOutput(
            request_id=req.request_id,
            outputs=outs,
            prompt_tokens=first.num_prompt_tokens,
            completion_tokens=sum(s.num_output_tokens for s in req.seqs),
            cached_tokens=first.num_cached_tokens,
            finished=req.finished,
        )

    # -- offline convenience --------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[
        list[list[int]]
    ]:
        """Run prompts to completion; return each request's n output token lists (for tests, benchmarks)."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"offline-{next(self._seq_ids)}" for _ in prompts]
        for rid, prompt, p in zip(ids, prompts, plist, strict=True):
            self.add_request(rid, prompt, copy.deepcopy(p))
        results = {rid: self.requests[rid] for rid in ids}
        while self.has_unfinished:
            self.step()
        return [[s.output_token_ids for s in results[rid].seqs] for rid in ids]


def default_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
