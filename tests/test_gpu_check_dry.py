"""benchmarks/gpu_check.py --dry runs the GPU check script's code paths on CPU (Triton interpreter), so the
script cannot rot between GPU sessions."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

# a minute of engines under the Triton interpreter: slow (tests/conftest.py starts slow files first)
pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_dry_run_passes():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry"], capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for name in ("paged_attention", "decode_split_kv", "store_kv+copy_blocks", "norm+rotary+silu", "quant_linear",
                 "engine_greedy_cuda_vs_cpu", "engine_seeded_sampling", "engine_mixed_requests_triton", "fused_moe",
                 "kv_quant"):
        assert f"CHECK {name}: PASS" in out, out[-4000:]
    for case in ('"case": "baseline"', '"case": "decode', '"case": "prefill', '"case": "store_kv',
                 '"case": "copy_blocks', '"case": "quant_gemv', '"case": "quant_gemm', '"case": "engine_decode',
                 '"case": "moe B=1 ', '"case": "moe B=64 ', '"case": "decode_kv_quant'):
        assert case in out, out[-4000:]
    assert "OK: 0 failure(s)" in out, out[-4000:]
