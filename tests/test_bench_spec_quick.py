"""benchmarks/bench_spec.py --quick runs every proposer (n-gram, a sibling draft model, the int4 self-draft) end
to end on a tiny model, so the script cannot rot; only its greedy identity is checked, not its figures."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_spec.py"


def test_bench_spec_quick_runs_every_proposer(tiny_model_dir):
    spec = importlib.util.spec_from_file_location("bench_spec", SCRIPT)
    assert spec and spec.loader
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    import common  # benchmarks/common.py, put on sys.path by the script

    if not common.SHARED_WORKLOAD.exists():
        pytest.skip(f"no {common.SHARED_WORKLOAD} (the shared benchmark workloads)")
    rows = bench.main(["--model", tiny_model_dir("llama"), "--dtype", "float32", "--quick", "--always-draft",
                       "--draft-layers", "1", "--self-quantization", "int4-g32"])
    assert [r["proposer"] for r in rows] == [
        "ngram", "ngram (adaptive)", "draft: first 1 layers", "draft: first 1 layers (adaptive)",
        "int4-g32 self-draft", "int4-g32 self-draft (adaptive)"]
    single = [r for r in rows if r["case"] == "single_stream_grounded"]
    assert all(r["identical"] for r in single)
    assert all(r["ratio"] > 0 for r in rows)
    assert single[2]["draft_time_s"] > 0 and single[2]["acceptance_rate"] > 0  # the self-draft drafted
