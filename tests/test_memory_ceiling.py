"""benchmarks/memory_ceiling.py: the bytes a decoded token reads, and the streaming-read probe it times."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from llamaserve.model import native
from tests.benchmark_scripts import BENCHMARKS, load_benchmark

needs_native = pytest.mark.skipif(not native.available(), reason="no AVX2 CPU or no C compiler")


def tiny_gguf(path: Path, head: bool) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", np.ones((64, 32), np.float32))  # 8,192 bytes
    w.add_tensor("blk.0.attn_q.weight", np.ones((32, 32), np.float16))  # 2,048 bytes
    if head:
        w.add_tensor("output.weight", np.ones((64, 32), np.float16))  # 4,096 bytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_token_reads_every_weight_but_the_embedding_unless_it_is_the_head(tmp_path) -> None:
    mod = load_benchmark("memory_ceiling")
    assert mod.bytes_per_token(tiny_gguf(tmp_path / "a.gguf", head=True)) == 2048 + 4096
    assert mod.bytes_per_token(tiny_gguf(tmp_path / "b.gguf", head=False)) == 2048 + 8192  # tied head


@needs_native
def test_stream_read_reads_every_byte_and_refuses_bad_buffers() -> None:
    buf = torch.zeros(4096, dtype=torch.uint8)
    assert native.stream_read(buf) == 0
    buf[3000] = 0x5A  # byte 3000 is byte 24 of its 32-byte lane group: bits 0-7 of the 4th int64
    assert native.stream_read(buf) == 0x5A
    buf[17] = 0x01  # byte 1 of the 3rd int64 of its vector
    assert native.stream_read(buf) == 0x5A ^ 0x0100
    for bad in (torch.zeros(100, dtype=torch.uint8), torch.zeros(256, dtype=torch.int8),
                torch.zeros(512, dtype=torch.uint8)[::2]):
        with pytest.raises(ValueError, match="multiple of 256"):
            native.stream_read(bad)


def test_the_probe_reads_pages_of_distinct_bytes_not_a_constant_fill(monkeypatch) -> None:
    """Weights are not a constant fill, and a host merging identical pages could flatter the rate."""
    mod = load_benchmark("memory_ceiling")
    seen: list[torch.Tensor] = []
    monkeypatch.setattr(mod.native, "stream_read", lambda b: seen.append(b) or 0)
    rates = mod.read_rates(1 / 1024, 2)  # 1 MiB
    assert len(rates) == 2 and len(seen) == 3  # a read to touch it, then the timed ones
    pages = seen[0].view(-1, 4096)
    assert len({bytes(p[:64].tolist()) for p in pages}) == pages.shape[0] == 256


def test_cpu_description_names_the_model_and_the_kernel_deciding_features(monkeypatch) -> None:
    cpuinfo = "processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu avx2 avx512f avx512_vnni\n"
    monkeypatch.setattr(native.Path, "read_text", lambda self, *a, **k: cpuinfo)
    assert native.cpu_description() == "AMD EPYC 9R14 (avx512f, avx512_vnni)"
    zen3 = "model name\t: Zen 3\nflags\t: avx2 fma\n"
    monkeypatch.setattr(native.Path, "read_text", lambda self, *a, **k: zen3)
    assert native.cpu_description() == "Zen 3 (no AVX-512, no AMX)"


@pytest.mark.parametrize("script", sorted(p.stem for p in BENCHMARKS.glob("*.py")))
def test_every_benchmark_script_imports(script) -> None:
    """A script whose imports broke (a helper moved or renamed) fails here, not in a long run."""
    load_benchmark(script)
