"""Turns a SchedulerOutput into batch tensors, runs the model over the paged cache, returns logits."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from llamaserve.config import EngineConfig
from llamaserve.engine.outputs import SchedulerOutput
from llamaserve.model.kv_cache import (
    KV_DTYPES,
    AttentionMetadata,
    PagedKVCache,
    build_metadata,
    decode_metadata,
)
from llamaserve.model.llama import Transformer
from llamaserve.model.native import FusedDecoder
from llamaserve.sysmem import GiB, free_memory, memory_margin, return_freed_memory

log = logging.getLogger("llamaserve.engine")
TRIM_AFTER_TOKENS = 256  # steps computing at least this many tokens give their freed heap back


@dataclass(frozen=True, slots=True)
class KVCachePlan:
    """The KV pool an engine allocates: its dtype and size, and how the size was chosen."""

    dtype: torch.dtype
    num_blocks: int
    block_size: int
    bytes_per_token: int
    how: str  # one line for the log: the GB asked for, or the free memory and margin auto sizing used

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return self.num_tokens * self.bytes_per_token

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def as_dict(self) -> dict[str, int | str]:
        """What /health reports."""
        return {"tokens": self.num_tokens, "blocks": self.num_blocks, "block_size": self.block_size,
                "dtype": self.dtype_name, "bytes_per_token": self.bytes_per_token,
                "bytes": self.nbytes, "sizing": self.how}

    def describe(self) -> str:
        return (f"KV cache: {self.num_tokens:,} tokens ({self.num_blocks} blocks of {self.block_size}) in "
                f"{self.dtype_name}, {self.bytes_per_token / 1024:.1f} KiB per token, "
                f"{self.nbytes / GiB:.2f} GiB ({self.how})")


def kv_cache_dtype(model: Transformer, config: EngineConfig) -> torch.dtype:
    """--kv-cache-dtype auto: float32 for a dense float32 model (the exact mode, --quantization none),
    else the activations' 16-bit dtype, else bfloat16."""
    if config.kv_cache_dtype != "auto":
        return KV_DTYPES[config.kv_cache_dtype]
    if model.dtype in (torch.bfloat16, torch.float16):
        return model.dtype
    exact = model.act_dtype is None and model.dtype == torch.float32  # dense float32 weights
    return torch.float32 if exact else torch.bfloat16


def auto_kv_blocks(free: int, total: int, per_block: int, context_blocks: int, max_num_seqs: int) -> int:
    """--kv-cache-memory auto: blocks for max_num_seqs contexts of context_blocks within `free` bytes
    less memory_margin(total); 0 when not even one context fits."""
    fit = max(0, free - memory_margin(total)) // per_block
    return 0 if fit < context_blocks else int(min(fit, context_blocks * max_num_seqs))


def plan_kv_cache(model: Transformer, config: EngineConfig, max_model_len: int,
                  memory: tuple[int, int] | None = None) -> KVCachePlan:
    """Size the pool: config.kv_cache_memory GB, or (0, auto) room for max_num_seqs full contexts of
    max_model_len tokens, within the free memory (`memory`, else free_memory()) less memory_margin().
    Raises ValueError when auto cannot hold one full context, or a GB value not even 2 blocks."""
    cfg, bs = model.config, config.block_size
    dtype = kv_cache_dtype(model, config)
    per_token = PagedKVCache.bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                                             dtype)
    per_block = per_token * bs
    if config.kv_cache_memory > 0:
        blocks = int(config.kv_cache_memory * 1024**3 // per_block)
        if blocks < 2:
            raise ValueError(
                f"kv_cache_memory={config.kv_cache_memory} GB holds {blocks} blocks of {per_block} bytes; "
                "give at least enough for 2 blocks"
            )
        return KVCachePlan(dtype, blocks, bs, per_token, f"--kv-cache-memory {config.kv_cache_memory:g}")
    free, total = memory or free_memory(next(model.parameters()).device)
    margin = memory_margin(total)
    one = -(-max_model_len // bs)  # blocks for one full context
    blocks = auto_kv_blocks(free, total, per_block, one, config.max_num_seqs)
    if not blocks:
        name = str(dtype).removeprefix("torch.")
        raise ValueError(
            f"the KV cache cannot hold one full context: {max_model_len:,} tokens x "
            f"{per_token / 1024:.1f} KiB ({name}) = {one * per_block / GiB:.2f} GiB, but "
            f"{free / GiB:.2f} GiB is free and {margin / GiB:.2f} GiB is kept as margin; lower "
            "--max-model-len, use --kv-cache-dtype int8, or set --kv-cache-memory GB"
        )
    how = (f"auto: {blocks / one:.1f} full {max_model_len}-token contexts; {free / GiB:.1f} GiB free, "
           f"{margin / GiB:.1f} GiB kept free")
    return KVCachePlan(dtype, blocks, bs, per_token, how)


class ModelRunner:
    """Owns the model and the KV pool; one call to `execute` per engine step."""

    def __init__(self, model: Transformer, config: EngineConfig, num_blocks: int,
                 kv_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.config = config
        self.device = next(model.parameters()).device
        self.dtype = model.dtype
        cfg = model.config
        self.cache = PagedKVCache(
            cfg.num_hidden_layers, num_blocks, config.block_size, cfg.num_key_value_heads,
            cfg.head_dim, kv_dtype or kv_cache_dtype(model, config), self.device,
        )
        # Decode steps of a model whose layers all run on our kernels take one C call (prefill: layers);
        # both store and read the KV pool with our kernels, in its own dtype.
        self.fused = FusedDecoder.for_model(model) if self.device.type == "cpu" else None
        if self.fused is not None:
            self.cache.use_native()
        log.info("decode steps: %s", "fused in one native call" if self.fused else "layer by layer")
        self.compiled = None
        self.num_eager_fallbacks = 0  # compiled mode: steps whose shapes had no warmed-up graph
        if config.compile:
            self.compiled = torch.compile(model.forward, dynamic=True)
            self._warm_up()

    def runs_fused(self, meta: AttentionMetadata) -> bool:
        """Whether a step runs all layers in one native call: one new token per sequence, on a model
        whose layers all run on our kernels (prefill chunks take the layer-by-layer path)."""
        return self.fused is not None and meta.q_dest is None

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The layer-by-layer forward (compiled where --compile warmed it up); fused steps: _decode_fused."""
        if self.compiled is not None:
            try:
                # Never compile while serving: a step of a shape class the warm-up missed runs eagerly.
                with torch.compiler.set_stance("fail_on_recompile"):
                    return self.compiled(ids, positions, meta, self.cache)
            except RuntimeError as e:  # torch raises a plain RuntimeError for a refused recompile
                if "fail_on_recompile" not in str(e):
                    raise
                self.num_eager_fallbacks += 1
                log.warning("compiled forward has no graph for this step's shapes; running it eagerly")
        return self.model(ids, positions, meta, self.cache)

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """Compile every shape class a step can take: prefill and decode, one sequence and several.

        The sizes are chosen pairwise different, so no accidental equality between two dimensions is
        baked into a graph. The dummy K/V land in blocks no sequence owns yet (nothing runs before this).
        """
        bs, start = self.config.block_size, time.perf_counter()
        per_seq = max(1, min(3, self.cache.num_blocks // 3))  # blocks per dummy sequence
        tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(3)]
        q = min(per_seq * bs - 1, 7)
        classes = [
            [(tables[0], 0, q)],  # prefill, one sequence
            [(tables[0], 0, q), (tables[1], 0, max(2, q - 2))],  # prefill / mixed, several
            [(tables[0], q, 1)],  # decode, one sequence
            [(tables[0], q, 1), (tables[1], q - 1, 1), (tables[2], q - 2, 1)],  # decode, several
        ]
        for chunks in classes:
            meta = build_metadata(chunks, bs, self.device)
            if self.runs_fused(meta):
                continue
            positions = [d + i for _, d, n in chunks for i in range(n)]
            ids = torch.zeros(len(positions), dtype=torch.long, device=self.device)
            self.compiled(ids, torch.tensor(positions, device=self.device), meta, self.cache)  # type: ignore[misc]
        seconds = time.perf_counter() - start
        log.info("compiled the forward for %d step shapes in %.1f s", len(classes), seconds)

    @torch.inference_mode()
    def embed(self, token_ids: list[int], pooling: str) -> list[float]:
        """An L2-normalised embedding of one sequence: the mean of its final hidden states, or the last
        one (`pooling` "mean" | "last"); prefill only, no KV block used."""
        return self.embed_many([token_ids], pooling)[0]

    @torch.inference_mode()
    def embed_many(self, prompts: list[list[int]], pooling: str) -> list[list[float]]:
        """embed for several sequences in one forward (each one's result as if alone)."""
        seqs = [torch.tensor(ids, dtype=torch.long, device=self.device) for ids in prompts]
        out = []
        for hidden in self.model.hidden_states_many(seqs):
            pooled = hidden.float().mean(dim=0) if pooling == "mean" else hidden[-1].float()
            out.append(torch.nn.functional.normalize(pooled, dim=0).tolist())
        return out

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> torch.Tensor:
        """Run every scheduled chunk; return float32 logits [S, vocab] for the S chunks that sample.

        With a fused decode path, one-token chunks always take it and longer chunks the layer path, in
        two forwards when a step has both: a sequence's arithmetic then never depends on whether a
        prefill happened to share its step (deterministic output under batching).
        """
        items = list(sched.scheduled)
        try:
            return self._execute_paths(items)
        finally:
            # A long prefill step's temporaries (tens of MB each) stay in glibc's heap, in RSS, unless
            # handed back; it costs far less than such a step.
            if self.device.type == "cpu" and sum(i.num_new_tokens for i in items) >= TRIM_AFTER_TOKENS:
                return_freed_memory()

    def _execute_paths(self, items: list) -> torch.Tensor:
        if self.fused is None:
            return self._execute(items)
        groups = [[i for i, item in enumerate(items) if _decodes(item) == single] for single in (True, False)]
        groups = [g for g in groups if g]
        if len(groups) < 2:
            return self._decode_fused(items) if _decodes(items[0]) else self._execute(items)
        logits = torch.cat([self._decode_fused([items[i] for i in g]) if _decodes(items[g[0]])
                            else self._execute([items[i] for i in g]) for g in groups])
        order = torch.tensor([i for g in groups for i in g if items[i].samples])  # item index of each row
        return logits[order.argsort()]  # rows back in the items' order

    def _decode_fused(self, items: list) -> torch.Tensor:
        """A step of decode chunks (one new token each) in one native call (the model's last norm
        included); logits of those that sample. Only the tensors that call reads are built: around it,
        Python is most of a one-sequence step's overhead."""
        if self.fused is None:
            raise RuntimeError("no fused decode path for this model")
        seqs = [item.seq for item in items]
        done = [seq.num_computed_tokens for seq in seqs]
        slots, ctx_slots, ctx_lens = decode_metadata([seq.block_table for seq in seqs], done,
                                                     self.config.block_size)
        ids = torch.tensor([seq.token_ids[d] for seq, d in zip(seqs, done, strict=True)], dtype=torch.long)
        x, cos, sin = self.model.embed(ids, torch.tensor(done, dtype=torch.long))
        hidden = self.fused.run(x, cos, sin, slots, ctx_slots, ctx_lens, self.cache.native or [])
        rows = [i for i, item in enumerate(items) if item.samples]
        if len(rows) < len(items):
            hidden = hidden[torch.tensor(rows, dtype=torch.long)]
        return self.model.logits(hidden)

    def _execute(self, items: list) -> torch.Tensor:
        """Chunks on the layer path: prefill, or every step of a model without the fused path."""
        ids: list[int] = []
        positions: list[int] = []
        chunks = []
        last_rows: list[int] = []  # row in the flat batch of each sampling chunk's last token
        for item in items:
            seq, n = item.seq, item.num_new_tokens
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            chunks.append((seq.block_table, start, n))
            if item.samples:
                last_rows.append(len(ids) - 1)
        if not chunks:
            return torch.empty((0, self.model.config.vocab_size), dtype=torch.float32, device=self.device)
        meta = build_metadata(chunks, self.config.block_size, self.device)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self._forward(input_ids, pos, meta)  # [T, hidden]
        if not last_rows:
            return hidden.new_empty((0, self.model.config.vocab_size), dtype=torch.float32)
        rows = torch.tensor(last_rows, dtype=torch.long, device=self.device)
        return self.model.logits(hidden[rows])


def _decodes(item: object) -> bool:
    """A one-token chunk of a sequence past its prompt: a decode step, which runs fused. Any chunk of a
    prompt (one token too, as after a prefix-cache hit or at a chunk boundary) takes the layer path, so
    a prompt's last row, whose logits give the first token, is computed alike however it was split."""
    seq = item.seq  # type: ignore[attr-defined]
    return item.num_new_tokens == 1 and seq.num_computed_tokens >= seq.num_prompt_tokens  # type: ignore[attr-defined]
