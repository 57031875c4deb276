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


def decode_rate(gen_n: Callable[[], Any], gen_1: Callable[[], Any], n: int, repeats: int,
                ) -> tuple[float, float, float]:
    """(decode tok/s, seconds for n tokens, seconds for 1 token) from median timings: prefill excluded."""
    t_n = median_time(gen_n, repeats)
    t_1 = median_time(gen_1, repeats)
    return (n - 1) / (t_n - t_1), t_n, t_1


def single_stream_rate(llm: Any, ids: list[int], n: int, repeats: int) -> float:
    """fastinfer single-stream greedy decode tok/s of ``llm`` on prompt ``ids`` (fixed length ``n``, prefill
    excluded, after one warm-up run)."""
    from fastinfer import SamplingParams

    def gen(k: int) -> Callable[[], Any]:
        sp = SamplingParams(temperature=0, max_tokens=k, ignore_eos=True)
        return lambda: llm.generate({"prompt_token_ids": ids}, sp, use_tqdm=False)

    gen(n)()  # warm-up
    rate, _, _ = decode_rate(gen(n), gen(1), n, repeats)
    return rate


def memory_bandwidth(repeats: int = 5) -> tuple[float, float]:
    """(read GB/s of a 1 GiB fp32 ``sum``, read + write GB/s of a 1 GiB copy), medians, with torch's threads."""
    import torch

    a = torch.ones(1 << 28)  # 1 GiB fp32
    b = torch.empty_like(a)
    n = a.numel() * a.element_size()
    t_sum = median_time(lambda: a.sum(), repeats)
    t_copy = median_time(lambda: b.copy_(a), repeats)
    return n / t_sum / 1e9, 2 * n / t_copy / 1e9


def machine_line() -> str:
    """``# CPU model; ISA ...`` for the head of a benchmark's output (figures mean nothing without it)."""
    import platform

    with open("/proc/cpuinfo") as fh:
        info = fh.read()
    isa = sorted({f for f in info.split() if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")})
    cpu = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
               platform.machine())
    return f"# {cpu}; ISA {' '.join(isa)}"


def llama_cpp_rate(path: str, ids: list[int], n: int, repeats: int, threads: int) -> float | None:
    """llama.cpp (``llama-cpp-python``) single-stream greedy decode tok/s on a GGUF file, prefill excluded and
    EOS masked (fixed lengths); None when the package is not installed. The prompt cache is reset per call."""
    try:
        from llama_cpp import Llama, LogitsProcessorList
    except ImportError:
        print("llama-cpp-python is not installed: no llama.cpp row (see ../shared/ENVIRONMENT.md)", file=sys.stderr)
        return None
    llm = Llama(model_path=path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, n_batch=512,
                verbose=False)
    eos = llm.token_eos()

    def no_eos(_ids, scores):  # fixed-length generations, like ignore_eos on our side
        scores[eos] = -float("inf")
        return scores

    def gen(k: int):
        def run():
            llm.reset()
            out = []
            for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True,
                                    logits_processor=LogitsProcessorList([no_eos])):
                out.append(tok)
                if len(out) == k:
                    break
            return out
        return run

    gen(n)()  # warm-up
    rate, _, _ = decode_rate(gen(n), gen(1), n, repeats)
    return rate


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
