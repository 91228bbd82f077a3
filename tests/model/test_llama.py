"""The transformer's own state: the RoPE table it caches."""

from __future__ import annotations

import torch

from llamaserve.config import ModelConfig
from llamaserve.model.llama import ROPE_CHUNK, Transformer


def test_rope_rows_come_from_a_table_that_does_not_depend_on_the_order_positions_came_in():
    """Transformer.embed looks RoPE rows up in a table computed ROPE_CHUNK positions at a time: the
    same values as computing them for the step alone, whichever positions were asked for first, and the
    table follows a change of the frequencies."""
    cfg = ModelConfig(vocab_size=32, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4 * ROPE_CHUNK)
    late = torch.tensor([3 * ROPE_CHUNK + 5, 7])
    a, b = Transformer(cfg), Transformer(cfg)
    a._rope_lookup(torch.tensor([1]), torch.float32)  # a grows its table in two steps, b in one
    for net in (a, b):
        cos, sin = net._rope_lookup(late, torch.float32)
        ref_cos, ref_sin = net._rope(late, torch.float32)
        assert torch.allclose(cos, ref_cos, atol=1e-6) and torch.allclose(sin, ref_sin, atol=1e-6)
    assert all(torch.equal(x, y) for x, y in zip(a._rope_lookup(late, torch.float32),
                                                  b._rope_lookup(late, torch.float32), strict=True))
    assert a._rope_table[2].shape[0] == b._rope_table[2].shape[0] == 4 * ROPE_CHUNK  # (capped at the context)
    a.inv_freq.mul_(2)  # in place, as the loader applies rope_freqs
    cos, _ = a._rope_lookup(late, torch.float32)
    assert torch.allclose(cos, a._rope(late, torch.float32)[0], atol=1e-6)
    assert not torch.allclose(cos, b._rope_lookup(late, torch.float32)[0], atol=1e-3)
    b.inv_freq = b.inv_freq * 2  # a new tensor, as the loader's rope_inv_freq(...).to(device)
    assert torch.equal(b._rope_lookup(late, torch.float32)[0], cos)
    _, x_cos, _ = a.embed(torch.tensor([1, 2]), late)
    assert x_cos.shape == (2, 1, cfg.head_dim)
