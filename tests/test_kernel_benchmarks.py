"""The kernel micro-benchmarks (benchmarks/kernels, pytest-benchmark) stay runnable: every op of the op set has a
row for the torch backend and for each compiled-CPU instruction-set variant this CPU runs, and the decode-shaped
rows run once each (``--benchmark-disable``: a smoke run, no timing claims)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fastinfer.ops import OPS
from tests.ops.conftest import SUPPORTED_ISAS

ROOT = Path(__file__).resolve().parents[1]


def _pytest(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "benchmarks/kernels", "-q", "-p", "no:cacheprovider",
                           "-p", "no:randomly", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_every_op_has_a_row_per_backend():
    proc = _pytest("--collect-only")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = {line.split("[")[0].split("::")[-1] for line in proc.stdout.splitlines() if "::" in line}
    for op in OPS:
        for backend in ["torch"] + [f"cpp_{isa}" for isa in SUPPORTED_ISAS]:
            assert f"test_{op}__{backend}" in names, (op, backend)


def test_decode_rows_run():
    proc = _pytest("--benchmark-disable", "-x", "-k", "t1- or b1-")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout
