"""Tensor parallelism: generation tok/s of the same batch at each ``--tp`` size, in one run.

    python benchmarks/bench_tp.py [--model random|smollm2-135m|DIR] [--tp 1,2] [--batch 8] [--max-tokens 64]

``--model random`` (the default) is a random Llama built here from a transformers config (``--hidden``,
``--layers``; 16 query / 8 KV heads, so 1, 2, 4 and 8 ranks divide it) with SmolLM2's tokenizer, saved to a
temporary directory: nothing is downloaded. SmolLM2-135M has 9 query / 3 KV heads: use ``--tp 1,3``.

Each size is a fresh ``LLM(model, tensor_parallel_size=N)`` (ranks 1..N-1 spawned; the start-up is reported
apart), one warm-up generate, then ``--repeats`` timed greedy generates of ``--batch`` distinct prompts of
``--max-tokens`` tokens each (prefix caching off, so every repeat prefills). Reports output tok/s (the median
repeat) and the ratio to the first size. Every size must produce the same tokens (checked: greedy, fp32 by
default on the CPU).

On a CPU the ranks are processes sharing the host's cores (each gets cores / N threads) and talk over gloo
(TCP on loopback): with few cores TP is expected to be slower than one process; it exists there for correctness
and for hosts with many cores. On GPUs (``--device cuda``, one GPU per rank) the same script runs NCCL.
``--quick``: tiny sizes, a smoke test of the script. Not run in CI.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import emit, machine_line, table  # noqa: E402

from fastinfer import LLM, SamplingParams  # noqa: E402

TEXT = ("the model splits its attention heads and its feed-forward columns across ranks so that each device "
        "holds a slice of every layer and one all-reduce joins them")
WORDS = TEXT.split(" ")


def prompts(n: int) -> list[str]:
    return [" ".join(WORDS[i % len(WORDS):] + WORDS[:i % len(WORDS)]) for i in range(n)]


def random_llama(hidden: int, layers: int, out_dir: str) -> str:
    """A random Llama (16 query heads, 8 KV heads, SwiGLU 2.75 x hidden) saved with SmolLM2's tokenizer."""
    import torch
    import transformers

    from fastinfer.models.gguf_loader import GGUFFile
    from fastinfer.models.loader import resolve_model_path
    from fastinfer.tokenizer import tokenizer_from_gguf

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                                   num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=8,
                                   max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1,
                                   eos_token_id=2)
    model = transformers.LlamaForCausalLM(cfg).float()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer_from_gguf(GGUFFile(resolve_model_path("smollm2-135m"))).save_pretrained(out_dir)
    return out_dir


def run(a: argparse.Namespace, tp: int) -> tuple[dict, list[list[int]]]:
    t0 = time.perf_counter()
    llm = LLM(a.model, tensor_parallel_size=tp, dtype=a.dtype, device=a.device, max_model_len=a.max_model_len,
              max_num_seqs=max(a.batch, 1), enable_prefix_caching=False, load_progress=False)
    start_s = time.perf_counter() - t0
    ps = prompts(a.batch)
    sp = SamplingParams(temperature=0, max_tokens=a.max_tokens, ignore_eos=True)
    llm.generate(ps, sp, use_tqdm=False)  # warm-up
    times, tokens = [], []
    for _ in range(a.repeats):
        t = time.perf_counter()
        outs = llm.generate(ps, sp, use_tqdm=False)
        times.append(time.perf_counter() - t)
        tokens = [list(o.outputs[0].token_ids) for o in outs]
    llm.shutdown()
    secs = statistics.median(times)
    row = {"tp": tp, "device": llm.engine.device, "dtype": llm.engine.dtype, "batch": a.batch,
           "max_tokens": a.max_tokens, "start_s": round(start_s, 2), "gen_s": round(secs, 3),
           "tok_s": round(a.batch * a.max_tokens / secs, 1)}
    return row, tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random", help="random (a random Llama built here), a short name or a path")
    ap.add_argument("--hidden", type=int, default=1024, help="--model random: hidden size")
    ap.add_argument("--layers", type=int, default=8, help="--model random: decoder layers")
    ap.add_argument("--tp", default="1,2", help="comma-separated tensor-parallel sizes")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the script")
    a = ap.parse_args()
    if a.quick:
        a.batch, a.max_tokens, a.repeats, a.hidden, a.layers = 2, 8, 1, 256, 2
    print(machine_line(), flush=True)
    tmp = tempfile.TemporaryDirectory(prefix="bench-tp-")
    if a.model == "random":
        a.model = random_llama(a.hidden, a.layers, tmp.name)
    rows: list[dict] = []
    ref: list[list[int]] | None = None
    for tp in (int(t) for t in a.tp.split(",")):
        row, tokens = run(a, tp)
        ref = tokens if ref is None else ref
        row["same_tokens"] = tokens == ref
        row["vs_first"] = round(row["tok_s"] / rows[0]["tok_s"], 3) if rows else 1.0
        emit(row, rows)
    print(table(rows, ["tp", "device", "dtype", "batch", "max_tokens", "start_s", "gen_s", "tok_s", "vs_first",
                       "same_tokens"]))
    return 0 if all(r["same_tokens"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
