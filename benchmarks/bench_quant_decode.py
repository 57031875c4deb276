"""End-to-end single-stream decode with quantized weights: fastinfer float (bf16 / fp32) vs fastinfer int4 (the
GGUF's own Q4_1 tensors, lossless) vs llama.cpp (``llama-cpp-python``) on the same Q4_1 file, same prompt
(token ids), greedy, fixed length, 2 threads, in one run.

    python benchmarks/bench_quant_decode.py                     # SmolLM2-135M Q4_1
    python benchmarks/bench_quant_decode.py --tokens 128 --repeats 5
    python benchmarks/bench_quant_decode.py --isa avx2 --dtypes float32   # an AVX2-only CPU's kernel path

Rows per dtype: the float model, ``quantization="gguf"`` (the file's Q4_1 bits, exact fp32 arithmetic over them)
and ``quantization="w4a8"`` (the same bits times int8-quantized activations, integer dot products: llama.cpp's own
Q4 x Q8 scheme, so the closest like-for-like row against it).

Decode rate excludes prefill for every engine: (N - 1) / (time for N tokens - time for 1 token), medians.
llama.cpp's prompt cache is reset between calls (``llm.reset()``) so every call pays the same prefill.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import emit, llama_cpp_rate, machine_line, make_workload, single_stream_rate, table  # noqa: E402

from fastinfer import LLM  # noqa: E402
from fastinfer.models.loader import load_tokenizer, resolve_model_path  # noqa: E402

# --modes: the decode step's compilation_config
MODES = {"eager": {"mode": "eager"}, "compile": {"mode": "compile"},
         "compile+cpp": {"mode": "compile", "inductor_compile_config": {"cpp_wrapper": True}}}


def fastinfer_rate(model: str, dtype: str, quantization: str | None, ids: list[int], n: int, repeats: int,
                   step: str = "eager") -> tuple[float, str]:
    llm = LLM(model, dtype=dtype, quantization=quantization, max_model_len=2048, max_num_seqs=1,
              enable_prefix_caching=False, load_progress=False, compilation_config=MODES[step])
    op = "quant_linear_a8" if quantization == "w4a8" else "quant_linear"
    return single_stream_rate(llm, ids, n, repeats), llm.engine.worker.ops.chosen.get(op, "-")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--isa", default="auto", help="force the compiled kernels' instruction set (avx2, avx512, ...)")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--modes", default="eager", help="decode step modes, comma-separated: eager, compile "
                    "(torch.compile of the step), compile+cpp (inductor's C++ wrapper)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from fastinfer.ops import cpp_backend

    print(machine_line())
    print(f"# kernel ISA {cpp_backend.cpu_isa(args.isa)}")
    path = resolve_model_path(args.model)
    tok = load_tokenizer(args.model)
    ids = tok.encode(make_workload("mixed", 1, 3)[0]["prompt"])[:256]
    rows: list[dict] = []
    dtypes = args.dtypes.split(",")
    modes = args.modes.split(",")
    if set(modes) - set(MODES):
        ap.error(f"--modes: unknown {sorted(set(modes) - set(MODES))} (known: {', '.join(MODES)})")
    runs = [(dt, q, md) for dt in dtypes for q in (None, "gguf", "w4a8") for md in (modes if q else modes[:1])]
    rates = {}
    for dtype, q, mode in runs:
        rate, backend = fastinfer_rate(path, dtype, q, ids, args.tokens, args.repeats, mode)
        rates.setdefault((dtype, q), rate)
        weights = {None: "float (dequantized)", "gguf": "int4 Q4_1 (lossless)",
                   "w4a8": "int4 Q4_1 x int8 activations"}[q]
        emit({"case": "decode", "engine": "fastinfer", "step": mode, "dtype": dtype, "weights": weights,
              "quant_backend": backend if q else "-", "tok_s": rate}, rows)
    lc = None if args.no_llama_cpp else llama_cpp_rate(path, ids, args.tokens, args.repeats, args.threads)
    if lc is not None:
        emit({"case": "decode", "engine": "llama.cpp", "step": "-", "dtype": "-", "weights": "Q4_1",
              "quant_backend": "ggml", "tok_s": lc}, rows)
    for r in rows:
        r["vs_float"] = r["tok_s"] / rates[(dtypes[0], None)]
        r["vs_llama_cpp"] = r["tok_s"] / lc if lc else float("nan")
    print()
    print(f"prompt {len(ids)} tokens, {args.tokens} new tokens, {args.threads} threads, medians of {args.repeats}")
    print(table(rows, ["engine", "step", "dtype", "weights", "quant_backend", "tok_s", "vs_float", "vs_llama_cpp"]))


if __name__ == "__main__":
    main()
