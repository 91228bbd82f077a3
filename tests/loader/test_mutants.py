"""A short run of `make stress`'s GGUF mutants (benchmarks/gguf_mutants.py) in CI: every broken file is
one line and exit 2 (or still a valid model), never a traceback, under an address-space limit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_sixteen_gguf_mutants_through_the_cli() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gguf_mutants.py"), "--count", "16",
                        "--seed", "7"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "**0 failures**" in r.stdout and "16 GGUF mutants" in r.stdout
