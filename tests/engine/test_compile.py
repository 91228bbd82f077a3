"""--compile: the compiled forward equals the eager one and never compiles after start-up."""

from __future__ import annotations

import torch

from llamaserve.config import EngineConfig, ModelConfig
from llamaserve.engine.model_runner import ModelRunner
from llamaserve.model.kv_cache import build_metadata
from llamaserve.model.llama import Transformer

CFG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)


def test_compiled_forward_matches_eager_for_every_step_shape() -> None:
    torch.manual_seed(0)
    net = Transformer(CFG).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    runner = ModelRunner(net, EngineConfig(compile=True), num_blocks=80)
    assert runner.compiled is not None
    bs = runner.config.block_size
    tables = [list(range(i * 8, (i + 1) * 8)) for i in range(6)]  # 128 tokens per sequence
    steps = [
        [(tables[0], 0, 40)],  # prefill, one sequence
        [(tables[1], 0, 100), (tables[0], 40, 1), (tables[2], 0, 3)],  # prefill chunks + a decode
        [(tables[0], 41, 1)],  # decode, one sequence
        [(tables[0], 42, 1), (tables[1], 100, 1), (tables[2], 3, 1), (tables[3], 0, 1), (tables[4], 0, 1)],
        [(tables[5], 0, 2)],  # a 2-token prompt
        [(tables[1], 101, 1), (tables[5], 2, 1)],
    ]
    with torch.inference_mode():
        for chunks in steps:
            meta = build_metadata(chunks, bs)
            positions = torch.tensor([d + i for _, d, n in chunks for i in range(n)])
            ids = torch.randint(0, CFG.vocab_size, positions.shape)
            compiled = runner._forward(ids, positions, meta)  # writes this step's K/V
            eager = net(ids, positions, meta, runner.cache)  # rewrites the same K/V
            assert (compiled - eager).abs().max().item() < 1e-4 * eager.abs().max().item()
        assert runner.num_eager_fallbacks == 0  # every shape had a graph from the warm-up
        # A step the warm-up cannot have seen (positions as int32) is not compiled mid-serving: it runs
        # eagerly, with the same result.
        chunks = [(tables[3], 1, 1)]
        meta = build_metadata(chunks, bs)
        ids, positions = torch.tensor([5]), torch.tensor([1], dtype=torch.int32)
        out = runner._forward(ids, positions, meta)
        assert runner.num_eager_fallbacks == 1
        assert torch.equal(out, net(ids, positions, meta, runner.cache))
