"""Helpers shared by the benchmark scripts: the standard workloads, timing, JSON + table output."""
from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SHARED_WORKLOAD = Path(__file__).resolve().parents[2] / "shared" / "bench" / "workload.py"


def make_workload(kind: str, n: int, seed: int = 0) -> list[dict]:
    """The team's standard workloads (``../shared/bench/workload.py``: real text, seeded)."""
    if not SHARED_WORKLOAD.exists():
        sys.exit(f"missing {SHARED_WORKLOAD}: the standard workload recipe lives in the shared folder")
    spec = importlib.util.spec_from_file_location("shared_workload", SHARED_WORKLOAD)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_workload(kind, n, seed)


def throughput(llm: Any, items: list[dict]) -> float:
    """Output tok/s of one ``LLM.generate`` over ``items`` ({"ids", "max_tokens"}), greedy, exact lengths."""
    from fastinfer import SamplingParams

    sps = [SamplingParams(temperature=0, max_tokens=it["max_tokens"], ignore_eos=True) for it in items]
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": it["ids"]} for it in items], sps, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def emit(row: dict, sink: list[dict]) -> None:
    """Print one JSON object per case (machine-readable) and keep it for the table."""
    sink.append(row)
    print(json.dumps(row), flush=True)


def table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    body = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths]), *(line(b) for b in body)])
