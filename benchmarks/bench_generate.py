"""End-to-end generation speed: fastinfer vs HF transformers ``generate`` (and vLLM's CPU build when
installed), same weights, same prompts (token ids), same process/run.

    python benchmarks/bench_generate.py                       # SmolLM2-135M, 32 mixed requests
    python benchmarks/bench_generate.py --plot bench.png --vllm-python /opt/vllm-venv/bin/python
    git worktree add /tmp/old OLD_COMMIT && cp fastinfer/_C*.so /tmp/old/fastinfer/  # (same csrc)
    python benchmarks/bench_generate.py --compare-src /tmp/old      # single-stream decode, old tree vs this

Cases: load time; (a) single-stream decode tok/s; (b) 32 requests of the standard 'mixed' workload:
fastinfer continuous batching vs HF one request at a time, vs HF static padded batches of 16, vs vLLM.
All runs are greedy with ``ignore_eos`` so every engine generates exactly the requested tokens.

``--compare-src DIR``: instead, single-stream decode of this tree against another checkout of fastinfer (an
older commit), fp32 and int4, each in its own subprocess through the public API only, alternating the two trees
``--rounds`` times (median): ms per decode step, the model's share of it (its
own forward and logits, timed inside the same run), and their difference: the per-step overhead (engine,
scheduler, input packing, sampling, detokenization).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import (  # noqa: E402
    decode_rate,
    emit,
    llama_cpp_rate,
    machine_line,
    make_workload,
    median_time,
    memory_bandwidth,
    single_stream_rate,
    table,
)

from fastinfer import LLM, SamplingParams  # noqa: E402
from fastinfer.models.loader import load_tokenizer, resolve_model_path  # noqa: E402

_DT = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def fastinfer_runs(args, prompts, max_tokens, single_ids, rows):
    out = {}
    for dtype in args.dtypes:
        t = time.perf_counter()
        llm = LLM(args.model, dtype=dtype, max_model_len=args.max_model_len, max_num_seqs=args.n,
                  load_progress=False)
        load_s = time.perf_counter() - t
        emit({"case": "load", "engine": "fastinfer", "dtype": dtype, "seconds": load_s,
              "backends": llm.engine.worker.ops.describe()}, rows)
        greedy = SamplingParams(temperature=0, max_tokens=args.single_tokens, ignore_eos=True)
        llm.generate({"prompt_token_ids": single_ids}, greedy, use_tqdm=False)  # warm-up
        s = median_time(lambda: llm.generate({"prompt_token_ids": single_ids}, greedy, use_tqdm=False),  # noqa: B023
                        args.repeats)
        sps = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
        t = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sps, use_tqdm=False)
        batch_s = time.perf_counter() - t
        n_out = sum(len(o.outputs[0].token_ids) for o in outs)
        assert n_out == sum(max_tokens)
        out[dtype] = {"single_tok_s": args.single_tokens / s, "batch_tok_s": n_out / batch_s,
                      "batch_s": batch_s, "preemptions": llm.engine.scheduler.num_preemptions}
    return out


def hf_runs(args, prompts, max_tokens, single_ids, rows):
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(args.model)
    out = {}
    for dtype in args.hf_dtypes:
        t = time.perf_counter()
        if path.endswith(".gguf"):
            d, f = os.path.split(path)
            model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=_DT[dtype]).eval()
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=_DT[dtype]).eval()
        emit({"case": "load", "engine": "hf", "dtype": dtype, "seconds": time.perf_counter() - t}, rows)
        model.generation_config.pad_token_id = 0

        @torch.inference_mode()
        def gen(batch: list[list[int]], new: int) -> None:
            width = max(len(p) for p in batch)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])  # left padding
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,  # noqa: B023
                           do_sample=False)

        gen([single_ids], 4)
        r = {"single_tok_s": args.single_tokens / median_time(lambda: gen([single_ids], args.single_tokens),
                                                             args.repeats)}
        r["decode_tok_s"], _, _ = decode_rate(lambda: gen([single_ids], args.single_tokens),
                                              lambda: gen([single_ids], 1), args.single_tokens, args.repeats)
        if not args.skip_hf_sequential:
            t = time.perf_counter()
            for p, m in zip(prompts, max_tokens):
                gen([p], m)
            r["sequential_tok_s"] = sum(max_tokens) / (time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(0, len(prompts), 16):  # static batches: each runs to its longest request
            gen(prompts[i:i + 16], max(max_tokens[i:i + 16]))
        r["static16_tok_s"] = sum(max_tokens) / (time.perf_counter() - t)
        out[dtype] = r
    return out


def weight_bytes_per_token(llm: LLM) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer once, except an embedding table that
    a separate (quantized) lm_head replaces for the logits (the lookup reads one row)."""
    model = llm.engine.worker.model
    seen, total = set(), 0
    has_head = getattr(model, "lm_head", None) is not None
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.data_ptr() in seen or (has_head and name.endswith("embed_tokens.weight")):
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


DECODE_CASES = [  # (label, LLM keyword arguments); one sequence at a time, so one rung for the compiled step
    ("eager float32", {"dtype": "float32"}),
    ("compiled float32", {"dtype": "float32", "compilation_config": {"mode": "compile"}}),
    ("eager int4 (Q4_1, lossless)", {"dtype": "float32", "quantization": "gguf"}),
    ("compiled int4 (Q4_1, lossless)", {"dtype": "float32", "quantization": "gguf",
                                        "compilation_config": {"mode": "compile"}}),
]
BF16_DECODE_CASES = [  # with --hf-dtypes ...,bfloat16: bf16 decode vs HF bf16 (dtype="auto" on AVX512-BF16 CPUs)
    ("eager bfloat16", {"dtype": "bfloat16"}),
    ("compiled bfloat16", {"dtype": "bfloat16", "compilation_config": {"mode": "compile"}}),
]


def decode_table(args, single_ids, hf, rows) -> None:
    """Single-stream decode (prefill excluded): fastinfer eager and compiled, float and the file's int4, vs HF
    float32 and llama.cpp on the same GGUF, and each run's fraction of the read bandwidth measured here."""
    read_bw, copy_bw = memory_bandwidth()
    emit({"case": "bandwidth", "read_gb_s": read_bw, "copy_gb_s": copy_bw}, rows)
    path = resolve_model_path(args.model)
    cpp = (llama_cpp_rate(path, single_ids, args.single_tokens, args.repeats, torch.get_num_threads())
           if path.endswith(".gguf") and not args.skip_llama_cpp else None)
    hf_rate = {dt: r["decode_tok_s"] for dt, r in hf.items() if r.get("decode_tok_s")}  # HF decode per dtype
    for label, kw in DECODE_CASES + (BF16_DECODE_CASES if "bfloat16" in hf_rate else []):
        t = time.perf_counter()
        llm = LLM(args.model, max_model_len=args.max_model_len, max_num_seqs=1, load_progress=False, **kw)
        start_s = time.perf_counter() - t
        rate = single_stream_rate(llm, single_ids, args.single_tokens, args.repeats)
        nbytes = weight_bytes_per_token(llm)
        base, ref = (cpp, "llama.cpp") if "int4" in label else (hf_rate.get(kw["dtype"]), f"hf {kw['dtype']}")
        emit({"case": "decode", "engine": f"fastinfer {label}", "tok_s": rate, "vs": ref,
              "ratio": rate / base if base else None, "weight_mb": nbytes / 1e6,
              "of_read_bw": nbytes * rate / (read_bw * 1e9), "start_s": start_s}, rows)
        del llm
    for dt, rate in hf_rate.items():
        emit({"case": "decode", "engine": f"hf generate {dt}", "tok_s": rate}, rows)
    if cpp:
        emit({"case": "decode", "engine": "llama.cpp Q4_1", "tok_s": cpp}, rows)


def vllm_run(args, prompts, max_tokens, dtype):
    if not (args.vllm_python and os.path.exists(args.vllm_python) and os.path.isdir(args.vllm_model)):
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for p, m in zip(prompts, max_tokens):
            f.write(json.dumps({"prompt_token_ids": p, "max_tokens": m}) + "\n")
    runner = os.path.join(os.path.dirname(__file__), "vllm_runner.py")
    proc = subprocess.run([args.vllm_python, runner, "--model", args.vllm_model, "--workload", f.name,
                           "--max-model-len", str(args.max_model_len), "--dtype", dtype], capture_output=True,
                          text=True)
    os.unlink(f.name)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        print(f"vLLM run failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1])


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = [r for r in rows if "ratio" in r]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(ratios) + 1.5))
    labels = [f"{r['case']} ({r.get('dtype', '')})" for r in ratios]
    ax.barh(labels, [r["ratio"] for r in ratios], color="tab:blue")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("fastinfer speed / baseline speed (higher is better)")
    ax.set_title("fastinfer vs baselines, same run (SmolLM2-135M, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


_STEP_PROBE = r"""
import json, statistics, sys, time
import torch
import fastinfer
from fastinfer import LLM, SamplingParams
model, quant, tokens, repeats = sys.argv[1], (sys.argv[2] or None), int(sys.argv[3]), int(sys.argv[4])
llm = LLM(model, dtype="float32", quantization=quant, max_model_len=2048, max_num_seqs=8, load_progress=False)
eng = llm.engine
net = eng.worker.model if hasattr(eng, "worker") else eng.runner.model
spent = [0.0]
def timed(fn):  # the model's own work (forward, logits), timed in the run itself
    def wrapper(*a, **k):
        t = time.perf_counter()
        out = fn(*a, **k)
        spent[0] += time.perf_counter() - t
        return out
    return wrapper
net.forward = timed(net.forward)
net.compute_logits = timed(net.compute_logits)
ids = list(range(1000, 1032))
greedy = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
llm.generate({"prompt_token_ids": ids}, greedy, use_tqdm=False)
one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
steps, model_s = [], []
for _ in range(repeats):
    spent[0] = 0.0
    t = time.perf_counter(); llm.generate({"prompt_token_ids": ids}, one, use_tqdm=False)
    t1 = time.perf_counter() - t; m1 = spent[0]
    spent[0] = 0.0
    t = time.perf_counter(); llm.generate({"prompt_token_ids": ids}, greedy, use_tqdm=False)
    steps.append((time.perf_counter() - t - t1) / (tokens - 1))
    model_s.append((spent[0] - m1) / (tokens - 1))
print(json.dumps({"step_ms": 1e3 * statistics.median(steps), "forward_ms": 1e3 * statistics.median(model_s),
                  "src": fastinfer.__file__}))
"""


def compare_trees(args) -> None:
    """Single-stream decode: this tree vs ``args.compare_src`` (an older checkout), alternated, medians."""
    import statistics

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = {"before": os.path.abspath(args.compare_src), "after": here}
    print(f"{machine_line()}; {args.single_tokens} tokens, "
          f"{args.rounds} alternated rounds", flush=True)
    rows: list[dict] = []
    for quant in ("", "int4"):
        got: dict[str, list[dict]] = {k: [] for k in trees}
        for _ in range(args.rounds):
            for name, src in trees.items():
                env = {**os.environ, "PYTHONPATH": src}
                r = subprocess.run([sys.executable, "-c", _STEP_PROBE, args.model, quant, str(args.single_tokens),
                                    str(args.repeats)], capture_output=True, text=True, env=env, cwd=src)
                if r.returncode:
                    sys.exit(f"{name} ({src}) failed:\n{r.stderr[-3000:]}")
                got[name].append(json.loads(r.stdout.strip().splitlines()[-1]))
        med = {k: {f: statistics.median(x[f] for x in v) for f in ("step_ms", "forward_ms")} for k, v in got.items()}
        b, a = med["before"], med["after"]
        emit({"case": "decode_step", "weights": quant or "fp32", "before_ms": b["step_ms"], "after_ms": a["step_ms"],
              "before_forward_ms": b["forward_ms"], "after_forward_ms": a["forward_ms"],
              "before_overhead_ms": b["step_ms"] - b["forward_ms"], "after_overhead_ms": a["step_ms"] - a["forward_ms"],
              "before_tok_s": 1e3 / b["step_ms"], "after_tok_s": 1e3 / a["step_ms"],
              "ratio": b["step_ms"] / a["step_ms"]}, rows)
    print()
    print(table(rows, ["case", "weights", "before_ms", "after_ms", "before_overhead_ms", "after_overhead_ms",
                       "before_tok_s", "after_tok_s", "ratio"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=32, help="requests in the mixed workload")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtypes", default="float32,bfloat16", type=lambda s: s.split(","))
    ap.add_argument("--hf-dtypes", default="float32", type=lambda s: s.split(","))
    ap.add_argument("--single-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-hf-sequential", action="store_true")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--skip-llama-cpp", action="store_true")
    ap.add_argument("--skip-decode-table", action="store_true",
                    help="no single-stream decode table (eager / compiled / HF / llama.cpp / bandwidth)")
    ap.add_argument("--vllm-python", default="/opt/vllm-venv/bin/python")
    ap.add_argument("--vllm-model", default=os.path.expanduser("~/.cache/fastinfer/smollm2-135m-hf"))
    ap.add_argument("--plot", default=None, help="write a PNG of the ratios")
    ap.add_argument("--compare-src", default=None, help="another fastinfer checkout: before/after decode steps")
    ap.add_argument("--rounds", type=int, default=3, help="alternated rounds of --compare-src")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.compare_src:
        compare_trees(args)
        return

    wl = make_workload("mixed", args.n, args.seed)

    tokenizer = load_tokenizer(args.model)
    prompts = [tokenizer.encode(w["prompt"]) for w in wl]
    max_tokens = [w["max_tokens"] for w in wl]
    single_ids = prompts[0][:32]
    print(machine_line(), flush=True)
    print(f"# workload: {len(prompts)} requests, {sum(map(len, prompts))} prompt tokens, {sum(max_tokens)} "
          f"output tokens; torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)

    rows: list[dict] = []
    ours = fastinfer_runs(args, prompts, max_tokens, single_ids, rows)
    hf = {} if args.skip_hf else hf_runs(args, prompts, max_tokens, single_ids, rows)
    best_hf_dtype = max(hf, key=lambda d: hf[d]["single_tok_s"]) if hf else None
    for dtype, o in ours.items():
        ref_dtype = dtype if dtype in hf else best_hf_dtype
        if ref_dtype is None:
            continue
        h = hf[ref_dtype]
        emit({"case": "single_stream", "dtype": dtype, "hf_dtype": ref_dtype,
              "fastinfer_tok_s": o["single_tok_s"], "hf_tok_s": h["single_tok_s"],
              "ratio": o["single_tok_s"] / h["single_tok_s"]}, rows)
        if "sequential_tok_s" in h:
            emit({"case": f"mixed{args.n}_vs_hf_sequential", "dtype": dtype, "hf_dtype": ref_dtype,
                  "fastinfer_tok_s": o["batch_tok_s"], "hf_tok_s": h["sequential_tok_s"],
                  "ratio": o["batch_tok_s"] / h["sequential_tok_s"]}, rows)
        emit({"case": f"mixed{args.n}_vs_hf_static16", "dtype": dtype, "hf_dtype": ref_dtype,
              "fastinfer_tok_s": o["batch_tok_s"], "hf_tok_s": h["static16_tok_s"],
              "ratio": o["batch_tok_s"] / h["static16_tok_s"]}, rows)
    for dtype, o in ours.items():
        v = None if args.skip_vllm else vllm_run(args, prompts, max_tokens, dtype)
        if v is not None:
            emit({"case": f"mixed{args.n}_vs_vllm_cpu", "dtype": dtype, "fastinfer_tok_s": o["batch_tok_s"],
                  "vllm_tok_s": v["output_tok_s"], "ratio": o["batch_tok_s"] / v["output_tok_s"],
                  "vllm_version": v.get("version"), "vllm_load_s": v.get("load_s")}, rows)
    for dtype, o in ours.items():
        emit({"case": "fastinfer_only", "dtype": dtype, **o}, rows)
    if not args.skip_decode_table:
        decode_table(args, single_ids, hf, rows)
        print()
        print(table([r for r in rows if r.get("case") == "decode"],
                    ["engine", "tok_s", "vs", "ratio", "weight_mb", "of_read_bw", "start_s"]))
    print()
    print(table([r for r in rows if "ratio" in r], ["case", "dtype", "fastinfer_tok_s", "hf_tok_s",
                                                    "vllm_tok_s", "ratio"]))
    if args.plot:
        plot(rows, args.plot)
        print(f"# plot written to {args.plot}")


if __name__ == "__main__":
    main()
