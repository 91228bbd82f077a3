"""Every supported GGUF tensor type reads back, through a real file, bit-exact with gguf's dequantize."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from llamaserve.loader.gguf import SUPPORTED_TYPES, dequantize_tensor
from tests.checkpoints import K_QUANTS, random_k_blocks

# Not square, and the columns a multiple of 256, so every type's blocks fit and a transpose shows.
ROWS, COLS = 6, 512


def raw_tensor(qtype: QT, rng: np.random.Generator) -> np.ndarray:
    """A [ROWS, COLS] tensor's bytes in qtype (K-quants: random blocks, which gguf cannot quantize)."""
    if qtype in K_QUANTS:
        return random_k_blocks(rng, ROWS, COLS, qtype)
    values = rng.standard_normal((ROWS, COLS)).astype(np.float32) * 3
    return quantize(values, qtype)


@pytest.mark.parametrize("qtype", sorted(SUPPORTED_TYPES), ids=lambda q: q.name)
def test_file_roundtrip_is_bit_exact(tmp_path, qtype: QT) -> None:
    data = raw_tensor(qtype, np.random.default_rng(int(qtype)))
    path = tmp_path / f"{qtype.name}.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    if data.dtype == np.uint8:
        writer.add_tensor("w", data, raw_dtype=qtype)
    else:
        writer.add_tensor("w", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    (tensor,) = gguf.GGUFReader(path).tensors
    assert tensor.tensor_type == qtype
    ours = dequantize_tensor(tensor)
    expected = dequantize(data, qtype).reshape(ROWS, COLS)
    assert ours.dtype == np.float32
    assert ours.shape == (ROWS, COLS)
    assert np.isfinite(ours).all()
    assert np.array_equal(ours, expected)
    assert np.unique(ours).size > COLS  # real values, not a constant
