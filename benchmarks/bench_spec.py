"""Speculative decoding: single-stream decode speed-up of each proposer on input-grounded prompts
("repeat this passage"), acceptance rates, and throughput at 32 concurrent requests with adaptive
speculation vs none, in one run.

    python benchmarks/bench_spec.py [--model smollm2-135m] [--k 4]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import emit, make_workload, table, throughput  # noqa: E402

from fastinfer import LLM, SamplingParams  # noqa: E402


def decode_speed(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    """Median single-stream tok/s over the prompts (one at a time) and the generated tokens."""
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    speeds, outs = [], []
    for p in prompts:
        t = time.perf_counter()
        o = llm.generate({"prompt_token_ids": p}, sp, use_tqdm=False)[0]
        speeds.append(len(o.outputs[0].token_ids) / (time.perf_counter() - t))
        outs.append(o.outputs[0].token_ids)
    return statistics.median(speeds), outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--concurrent", type=int, default=32)
    args = ap.parse_args()
    spec = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    common = dict(dtype=args.dtype, max_model_len=4096, max_num_seqs=args.concurrent, load_progress=False)
    plain = LLM(args.model, **common)
    ngram = LLM(args.model, speculative_config=spec, **common)
    tok = plain.get_tokenizer()
    grounded = [plain.chat_prompt(w["messages"])["prompt_token_ids"]
                for w in make_workload("grounded", args.prompts, 0)]
    rows: list[dict] = []
    decode_speed(plain, grounded[:1], 8)
    decode_speed(ngram, grounded[:1], 8)
    base, base_out = decode_speed(plain, grounded, args.max_tokens)
    fast, fast_out = decode_speed(ngram, grounded, args.max_tokens)
    st = ngram.engine.spec_stats
    emit({"case": "single_stream_grounded", "proposer": "ngram", "k": args.k, "plain_tok_s": base,
          "spec_tok_s": fast, "ratio": fast / base, "identical": base_out == fast_out,
          "acceptance_rate": st["accepted_tokens"] / max(1, st["draft_tokens"]),
          "mean_accepted_per_step": st["accepted_tokens"] / max(1, st["steps"])}, rows)
    items = [{"ids": tok.encode(w["prompt"]), "max_tokens": w["max_tokens"]}
             for w in make_workload("mixed", args.concurrent, 3)]
    b0 = throughput(plain, items)
    b1 = throughput(ngram, items)
    emit({"case": f"throughput_{args.concurrent}_concurrent", "proposer": "ngram (adaptive)", "plain_tok_s": b0,
          "spec_tok_s": b1, "ratio": b1 / b0}, rows)
    print()
    print(table(rows, ["case", "proposer", "plain_tok_s", "spec_tok_s", "ratio", "acceptance_rate"]))


if __name__ == "__main__":
    main()
