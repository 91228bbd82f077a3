"""benchmarks/kernel_ab.py: a revision's kernel sources, the alternated comparison, its refusals."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from llamaserve.loader.registry import resolve_model
from llamaserve.model import native
from tests.benchmark_scripts import load_benchmark

needs_native = pytest.mark.skipif(not native.available(), reason="no AVX2 CPU or no C compiler")
kab = load_benchmark("kernel_ab")


def test_sources_at_writes_the_revisions_kernel_files(tmp_path: Path) -> None:
    written = kab.sources_at("HEAD", tmp_path)
    names = {p.name for p in written}
    assert set(native._SOURCES) <= names and "ls.h" in names
    for p in written:
        committed = subprocess.run(["git", "-C", str(kab.REPO), "show", f"HEAD:{kab.CSRC}/{p.name}"],
                                   capture_output=True, check=True).stdout
        assert p.read_bytes() == committed


def test_a_revision_without_kernel_sources_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no kernel sources at 'no-such-rev'"):
        kab.sources_at("no-such-rev", tmp_path)


def test_a_file_that_is_not_a_llama_gguf_or_too_few_layers_is_a_one_line_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(SystemExit, match="not a readable GGUF file"):
        kab.cases_from(junk, rows=[1], batches=[1], max_layers=1)
    with pytest.raises(SystemExit, match="--layers must be 1..30"):
        kab.cases_from(Path(resolve_model(None)), rows=[1], batches=[1], max_layers=31)


def test_contexts_are_60_to_159_tokens_in_distinct_blocks_and_a_small_pool_is_refused() -> None:
    chunks = kab.contexts(12, 16, 12 * 10 + 1)
    assert all(59 <= done <= 158 and n == 1 for _, done, n in chunks)
    blocks = [b for table, _, _ in chunks for b in table]
    assert len(blocks) == len(set(blocks)) == 120 and 0 not in blocks
    with pytest.raises(SystemExit, match="too few for 12 sequences"):
        kab.contexts(12, 16, 100)


def test_compare_alternates_and_says_when_the_bits_differ() -> None:
    calls: list[str] = []

    def run(lib) -> list[torch.Tensor]:  # noqa: ANN001
        calls.append(lib)
        return [torch.tensor([1.0 if lib == "a" else 2.0])]

    same = kab.Case("same", lambda lib: [torch.zeros(3)])
    rows = kab.compare("a", "b", [kab.Case("differs", run), same], rounds=4)
    # the warm-up, then each round in turn, the order swapped every round
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]
    assert [r.name for r in rows] == ["differs", "same"]
    assert not rows[0].same and rows[1].same
    assert all(r.ratio > 0 and r.a_ms >= 0 and r.b_ms >= 0 for r in rows)
    assert "| differs |" in kab.table(rows) and "**no**" in kab.table(rows)


@needs_native
def test_the_embedded_models_cases_run_the_same_bits_through_one_library() -> None:
    cases = kab.cases_from(Path(resolve_model(None)), rows=[1, 5], batches=[3], max_layers=1)
    names = ["layers M=1", "layers M=5", "head M=1", "head M=5", "layers + head M=1", "layers + head M=5",
             "decode attention B=3"]
    assert [c.name for c in cases] == names
    lib = native.kernels().lib
    rows = kab.compare(lib, lib, cases, rounds=2)
    assert all(r.same for r in rows)


@needs_native
def test_a_library_of_another_variant_is_refused() -> None:
    variant = native.kernels().variant
    other = "avx2" if variant != "avx2" else "avx512vnni"
    with pytest.raises(SystemExit, match="variant"):
        kab.load(native._build(variant), other)


@needs_native
def test_the_decode_step_case_runs_the_engines_fused_call() -> None:
    case = kab.decode_case(Path(resolve_model(None)), batch=2)
    assert case.name == "decode step B=2"
    lib = native.kernels().lib
    first, again = case.run(lib), case.run(lib)
    assert first[0].shape[0] == 2 and torch.isfinite(first[0]).all()
    assert torch.equal(first[0], again[0])  # each run starts from the same input
    assert kab.compare(lib, lib, [case], rounds=1)[0].same
