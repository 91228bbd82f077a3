"""Turns a SchedulerOutput into batch tensors, runs the model over the paged cache, returns logits."""

from __future__ import annotations

import torch

from llamaserve.config import EngineConfig
from llamaserve.engine.outputs import SchedulerOutput
from llamaserve.model.kv_cache import PagedKVCache, build_metadata
from llamaserve.model.llama import Transformer


def kv_cache_blocks(model: Transformer, config: EngineConfig, dtype: torch.dtype) -> int:
    """How many blocks of the KV pool fit in config.kv_cache_memory gigabytes."""
    cfg = model.config
    per_block = PagedKVCache.bytes_per_block(
        cfg.num_hidden_layers, config.block_size, cfg.num_key_value_heads, cfg.head_dim, dtype
    )
    blocks = int(config.kv_cache_memory * 1024**3 // per_block)
    if blocks < 2:
        raise ValueError(
            f"kv_cache_memory={config.kv_cache_memory} GB holds {blocks} blocks of {per_block} bytes; "
            "give at least enough for 2 blocks"
        )
    return blocks


class ModelRunner:
    """Owns the model and the KV pool; one call to `execute` per engine step."""

    def __init__(self, model: Transformer, config: EngineConfig, num_blocks: int) -> None:
        self.model = model
        self.config = config
        self.device = next(model.parameters()).device
        self.dtype = model.dtype
        cfg = model.config
        self.cache = PagedKVCache(
            cfg.num_hidden_layers, num_blocks, config.block_size, cfg.num_key_value_heads,
            cfg.head_dim, self.dtype, self.device,
        )

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> torch.Tensor:
        """Run every scheduled chunk; return float32 logits [S, vocab] for the S chunks that sample."""
        ids: list[int] = []
        positions: list[int] = []
        chunks = []
        last_rows: list[int] = []  # row in the flat batch of each sampling chunk's last token
        for item in sched.scheduled:
            seq, n = item.seq, item.num_new_tokens
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            chunks.append((seq.block_table, start, n))
            if item.samples:
                last_rows.append(len(ids) - 1)
        meta = build_metadata(chunks, self.config.block_size, self.device)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, pos, meta, self.cache)  # [T, hidden]
        if not last_rows:
            return hidden.new_empty((0, self.model.config.vocab_size), dtype=torch.float32)
        rows = torch.tensor(last_rows, dtype=torch.long, device=self.device)
        return self.model.logits(hidden[rows])
