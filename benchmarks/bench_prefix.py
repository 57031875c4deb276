"""Prefix caching: time to first token for a 1,024-token shared prefix + 32-token suffix with the cache
warm vs off, and throughput at a 0% hit rate with caching on vs off (its overhead), in one run.

    python benchmarks/bench_prefix.py [--model smollm2-135m] [--dtype auto]
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


def ttft(llm: LLM, prompts: list[list[int]]) -> float:
    """Median time of a 1-token generation (prefill + first sample) over the prompts, one at a time."""
    one = SamplingParams(temperature=0, max_tokens=1)
    times = []
    for p in prompts:
        t = time.perf_counter()
        llm.generate({"prompt_token_ids": p}, one, use_tqdm=False)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--prefix-tokens", type=int, default=1024)
    ap.add_argument("--suffix-tokens", type=int, default=32)
    ap.add_argument("--samples", type=int, default=7)
    ap.add_argument("--n", type=int, default=16, help="requests in the 0%-hit throughput run")
    args = ap.parse_args()

    llms = {on: LLM(args.model, dtype=args.dtype, max_model_len=4096, enable_prefix_caching=on,
                    load_progress=False) for on in (True, False)}
    tok = llms[True].get_tokenizer()
    shared = make_workload("shared-prefix", args.samples + 1, 0)
    extra = " ".join(w["prompt"] for w in make_workload("mixed", 4, 2))  # the shared context is ~900 tokens
    ctx = tok.encode(shared[0]["prompt"] + "\n\n" + extra)
    assert len(ctx) >= args.prefix_tokens, "shared context shorter than the prefix asked for"
    prefix = ctx[:args.prefix_tokens]
    filler = tok.encode(" ".join(w["prompt"][-400:] for w in make_workload("mixed", args.samples + 1, 1)))
    suffixes = [filler[i * args.suffix_tokens:(i + 1) * args.suffix_tokens] for i in range(args.samples + 1)]
    prompts = [prefix + s for s in suffixes]
    rows: list[dict] = []
    ttft(llms[True], prompts[:1])  # warm the cache with the prefix
    warm = ttft(llms[True], prompts[1:])
    ttft(llms[False], prompts[:1])
    cold = ttft(llms[False], prompts[1:])
    emit({"case": "ttft_shared_prefix", "prefix_tokens": args.prefix_tokens, "suffix_tokens": args.suffix_tokens,
          "cache_warm_s": warm, "cache_off_s": cold, "ratio": cold / warm}, rows)

    wl = make_workload("mixed", args.n, 7)
    items = [{"ids": tok.encode(w["prompt"]), "max_tokens": w["max_tokens"]} for w in wl]
    results = {}
    for on in (False, True, False, True):  # interleaved, best of two each: less sensitive to machine noise
        llm = llms[on]
        llm.reset_prefix_cache()  # 0% hit rate: nothing from the previous pass
        hits0 = llm.engine.kv.prefix_hits
        results[on] = max(results.get(on, 0.0), throughput(llm, items))
        assert llm.engine.kv.prefix_hits == hits0 or not on, "the 0%-hit workload hit the cache"
    emit({"case": "throughput_0pct_hits", "requests": args.n, "cache_on_tok_s": results[True],
          "cache_off_tok_s": results[False], "ratio": results[True] / results[False]}, rows)
    print()
    print(table(rows, ["case", "cache_warm_s", "cache_off_s", "cache_on_tok_s", "cache_off_tok_s", "ratio"]))


if __name__ == "__main__":
    main()
