"""The int8 KV cache vs the float one (the model dtype, ``kv_cache_dtype="auto"``), in one run on this CPU.

    python benchmarks/bench_kv_quant.py [--quick] [--contexts 1024,4096,16384] [--batches 1,8,32]

1. Decode attention per layer, the op alone (``cpp`` backend, SmolLM2-135M's layer: 9 query heads, 3 KV heads,
   D 64, block 16): median ms of one decode step of ``batch`` sequences at ``context`` tokens, float vs int8
   caches, the same-run ratio, and the KV bytes each reads per second. Each case cycles several distinct caches
   (at most ``--attn-kv-mib`` of them per dtype) so the reads come from memory, not a warm L3.
2. End-to-end decode tok/s through ``LLMEngine`` (SmolLM2-135M): ``batch`` distinct prompts of ``context``
   tokens prefill first (not timed), then ``--decode-steps`` steps of every sequence decoding are timed; float
   vs int8 KV. Cases with ``context`` above the model's positions (16k > SmolLM2's 8k) or more than
   ``--e2e-max-tokens`` tokens of prompts in all (16k x 32, 4k x 32: minutes of CPU prefill) are skipped and
   said so; the attention rows cover them.
3. The most concurrent sequences of each context the same ``--kv-memory-gib`` holds (the engine's own KV plan).

Not run in CI. ``--quick``: tiny sizes, a smoke test of the script (seconds).
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402
from common import emit, machine_line, table  # noqa: E402

from fastinfer import LLM, SamplingParams  # noqa: E402
from fastinfer.ops import AttentionMetadata, cpp_backend, reference  # noqa: E402

H, HKV, D, BLOCK = 9, 3, 64, 16  # SmolLM2-135M's attention layer
MAX_LAYERS = 256  # distinct caches per attention case (the small ones: 100+ MB, past any L3)


def paged_layers(batch: int, context: int, dtype: torch.dtype, kv: str, max_bytes: int, seed: int = 0):
    """Distinct (q, k_cache, v_cache) layers of ``batch`` sequences x ``context`` tokens in shuffled blocks, as
    many as fit ``max_bytes`` (at least one, at most MAX_LAYERS), their metadata and the KV bytes one call reads."""
    rng = random.Random(seed)
    nb = -(-context // BLOCK)
    pool = batch * nb + 4
    ids = list(range(pool))
    rng.shuffle(ids)
    meta = AttentionMetadata.build([1] * batch, [context] * batch, [ids[i * nb:(i + 1) * nb] for i in range(batch)],
                                   BLOCK)
    row_bytes = (D + 2) if kv == "int8" else D * torch.empty(0, dtype=dtype).element_size()
    per_layer = 2 * pool * BLOCK * HKV * row_bytes
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(min(MAX_LAYERS, max(1, max_bytes // per_layer))):
        caches = []
        for _kv in range(2):
            x = torch.randn(pool, BLOCK, HKV, D, generator=gen)
            caches.append(reference.quantize_kv_rows(x, "int8") if kv == "int8" else x.to(dtype))
        layers.append((torch.randn(batch, H, D, generator=gen).to(dtype), *caches))
    return layers, meta, 2 * batch * context * HKV * row_bytes


def attention_case(batch: int, context: int, args) -> dict:
    dtype = getattr(torch, args.dtype)
    row = {"part": "attention", "batch": batch, "context": context, "dtype": args.dtype}
    for kv in ("auto", "int8"):
        layers, meta, read = paged_layers(batch, context, dtype, kv, args.attn_kv_mib << 20)
        for layer in layers:  # warm-up
            cpp_backend.paged_attention(*layer, meta, D ** -0.5)
        times = []
        for r in range(args.repeats):
            layer = layers[r % len(layers)]
            t = time.perf_counter()
            cpp_backend.paged_attention(*layer, meta, D ** -0.5)
            times.append(time.perf_counter() - t)
        ms = statistics.median(times) * 1e3
        row[f"{kv}_ms"] = round(ms, 4)
        row[f"{kv}_gb_s"] = round(read / ms / 1e6, 2)
        row[f"{kv}_layers"] = len(layers)
    row["int8_speedup"] = round(row["auto_ms"] / row["int8_ms"], 3)
    return row


def decode_rate(llm: LLM, batch: int, context: int, steps: int, seed: int) -> float:
    """Tokens per second of ``steps`` engine steps in which all ``batch`` sequences decode (prefill untimed)."""
    eng = llm.engine
    vocab = min(eng.worker.info.vocab_size, 30000)
    rng = random.Random(seed)
    sp = SamplingParams(temperature=0, max_tokens=steps + 2, ignore_eos=True)
    for i in range(batch):
        eng.add_request(f"s{seed}-{i}", {"prompt_token_ids": [rng.randrange(100, vocab) for _ in range(context)]},
                        sp)
    produced = 0
    while produced < batch:  # every prompt prefilled and sampled its first token
        produced += sum(len(o.outputs[0].token_ids) == 1 for o in eng.step())
    t = time.perf_counter()
    for _ in range(steps):
        eng.step()
    rate = batch * steps / (time.perf_counter() - t)
    while eng.has_unfinished_requests():
        eng.step()
    return rate


def e2e_cases(args, contexts: list[int], batches: list[int], rows: list[dict]) -> None:
    memory = int(args.kv_memory_gib * (1 << 30))
    llms = {kv: LLM(args.model, dtype=args.dtype, kv_cache_dtype=kv, kv_cache_memory_bytes=memory,
                    max_model_len=min(max(contexts) + args.decode_steps + 8, args.max_model_len),
                    max_num_seqs=max(batches), enable_prefix_caching=False, load_progress=False)
            for kv in ("auto", "int8")}
    positions = llms["auto"].engine.worker.max_model_len
    for context in contexts:
        capacity = {kv: llm.engine.num_kv_blocks * llm.engine.config.block_size // (context + args.decode_steps)
                    for kv, llm in llms.items()}
        emit({"part": "capacity", "context": context, "kv_memory_gib": args.kv_memory_gib,
              "auto_max_seqs": capacity["auto"], "int8_max_seqs": capacity["int8"],
              "ratio": round(capacity["int8"] / max(1, capacity["auto"]), 3)}, rows)
        for batch in batches:
            base = {"part": "e2e", "batch": batch, "context": context, "dtype": args.dtype}
            why = None
            if context + args.decode_steps + 2 > positions:
                why = f"context beyond the engine's {positions} positions"
            elif batch * context > args.e2e_max_tokens:
                why = f"{batch * context} prompt tokens > --e2e-max-tokens {args.e2e_max_tokens}"
            elif batch > min(capacity.values()):
                why = f"{batch} sequences do not fit the KV memory"
            if why is not None:
                emit({**base, "skipped": why}, rows)
                continue
            rates = {kv: decode_rate(llm, batch, context, args.decode_steps, seed=context + batch)
                     for kv, llm in llms.items()}
            emit({**base, "auto_tok_s": round(rates["auto"], 2), "int8_tok_s": round(rates["int8"], 2),
                  "int8_speedup": round(rates["int8"] / rates["auto"], 3)}, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the script")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--contexts", default="1024,4096,16384")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--attn-kv-mib", type=int, default=1024, help="KV bytes of distinct layers cycled per case")
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--e2e-max-tokens", type=int, default=32768, help="skip e2e cases with more prompt tokens")
    ap.add_argument("--kv-memory-gib", type=float, default=4.0)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--skip-e2e", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.contexts, args.batches, args.repeats, args.attn_kv_mib = "256,1024", "1,4", 3, 8
        args.decode_steps, args.e2e_max_tokens, args.kv_memory_gib = 4, 2048, 0.25
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    print(f"{machine_line()}; kernel ISA {cpp_backend.cpu_isa()}; threads {torch.get_num_threads()}", flush=True)
    rows: list[dict] = []
    for context in contexts:
        for batch in batches:
            emit(attention_case(batch, context, args), rows)
    if not args.skip_e2e:
        e2e_cases(args, contexts, batches, rows)
    print()
    print(machine_line())
    for part, cols in (("attention", ["batch", "context", "auto_ms", "int8_ms", "int8_speedup", "auto_gb_s",
                                      "int8_gb_s", "auto_layers"]),
                       ("e2e", ["batch", "context", "auto_tok_s", "int8_tok_s", "int8_speedup", "skipped"]),
                       ("capacity", ["context", "kv_memory_gib", "auto_max_seqs", "int8_max_seqs", "ratio"])):
        part_rows = [r for r in rows if r["part"] == part]
        if part_rows:
            print(table(part_rows, cols))
            print()
    print(f"(float KV = the model dtype {args.dtype}; attention: median of {args.repeats} calls; e2e: "
          f"{args.decode_steps} decode steps after an untimed prefill)")


if __name__ == "__main__":
    main()
