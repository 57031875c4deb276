"""CPU paged attention: the compiled kernel (cpp backend) vs the torch backend, plus achieved bandwidth.

    python benchmarks/bench_cpu_attention.py [--repeats 20] [--layers 8] [--cases decode32,decode1_long]

Each case builds ``--layers`` separate KV caches (random, non-contiguous block ids in a pool) and cycles
through them, so every call reads its KV from memory as it would in a many-layer model, not from a warm L3.
Prints one JSON object per case (median ms of each backend, speedup, KV GB/s achieved by the kernel and
its fraction of the torch copy bandwidth measured in the same run), then a short table.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from fastinfer.ops import cpp_backend, torch_backend
from fastinfer.ops.metadata import AttentionMetadata

# name -> (query_lens, seq_lens) builder; model shape SmolLM2-135M-like: H=9, Hkv=3, D=64.
CASES = {
    "decode32": lambda rng: ([1] * 32, [rng.randint(50, 1400) for _ in range(32)]),
    "decode1_long": lambda rng: ([1], [16384]),
    "decode8_4k": lambda rng: ([1] * 8, [4096] * 8),
    "prefill512_ctx1536": lambda rng: ([512], [2048]),
    "prefill1024": lambda rng: ([1024], [1024]),
    "mixed30+2x256": lambda rng: ([1] * 30 + [256] * 2, [rng.randint(50, 1400) for _ in range(30)] + [256, 1024]),
}
DEFAULT_CASES = "decode32,decode1_long,decode8_4k,prefill512_ctx1536,prefill1024,mixed30+2x256"


def copy_bandwidth(nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """Bytes moved (read + write) per second by a large torch copy."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times[1:])


def timed(fn, layers: list, repeats: int) -> float:
    """Median seconds of fn(layer) over repeats, cycling layers (one warm-up pass first)."""
    for layer in layers:
        fn(layer)
    times = []
    for r in range(repeats):
        layer = layers[r % len(layers)]
        t0 = time.perf_counter()
        fn(layer)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_case(name: str, args, copy_bw: float) -> dict:
    rng = random.Random(0)
    query_lens, seq_lens = CASES[name](rng)
    H, Hkv, D, bs, dtype = args.heads, args.kv_heads, args.head_dim, args.block_size, getattr(torch, args.dtype)
    nbs = [-(-s // bs) for s in seq_lens]
    pool = int(sum(nbs) * 1.25) + 8
    ids = list(range(pool))
    rng.shuffle(ids)
    block_ids, k = [], 0
    for n in nbs:
        block_ids.append(ids[k:k + n])
        k += n
    meta = AttentionMetadata.build(query_lens, seq_lens, block_ids, bs)
    g = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(args.layers):
        kc = torch.randn(pool, bs, Hkv, D, generator=g).to(dtype)
        vc = torch.randn(pool, bs, Hkv, D, generator=g).to(dtype)
        q = torch.randn(sum(query_lens), H, D, generator=g).to(dtype)
        layers.append((q, kc, vc))
    scale = D ** -0.5

    def cpp(layer):
        cpp_backend.paged_attention(layer[0], layer[1], layer[2], meta, scale)

    def ref(layer):
        torch_backend.paged_attention(layer[0], layer[1], layer[2], meta, scale)

    o1 = cpp_backend.paged_attention(*layers[0], meta, scale).float()
    o2 = torch_backend.paged_attention(*layers[0], meta, scale).float()
    max_diff = (o1 - o2).abs().max().item()
    t_cpp = timed(cpp, layers, args.repeats)
    t_torch = timed(ref, layers, args.repeats)
    kv_bytes = 2 * sum(seq_lens) * Hkv * D * torch.empty(0, dtype=dtype).element_size()
    gbs = kv_bytes / t_cpp / 1e9
    return {
        "case": name, "batch": len(seq_lens), "tokens": sum(query_lens), "sum_seq_len": sum(seq_lens),
        "H": H, "Hkv": Hkv, "D": D, "block_size": bs, "dtype": args.dtype, "threads": torch.get_num_threads(),
        "isa": cpp_backend.cpu_isa(), "cpp_ms": round(t_cpp * 1e3, 4), "torch_ms": round(t_torch * 1e3, 4),
        "speedup": round(t_torch / t_cpp, 2), "kv_mb": round(kv_bytes / 1e6, 2), "cpp_kv_gb_s": round(gbs, 2),
        "copy_gb_s": round(copy_bw / 1e9, 2), "frac_of_copy_bw": round(gbs * 1e9 / copy_bw, 3),
        "max_abs_diff_vs_torch": max_diff,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=DEFAULT_CASES)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--layers", type=int, default=8, help="distinct KV caches cycled (defeats the L3)")
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()
    copy_bw = copy_bandwidth()
    rows = []
    for name in args.cases.split(","):
        row = run_case(name, args, copy_bw)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\n{'case':<22}{'cpp ms':>10}{'torch ms':>10}{'speedup':>9}{'KV MB':>9}{'GB/s':>8}{'of copy':>9}")
    for r in rows:
        print(f"{r['case']:<22}{r['cpp_ms']:>10.3f}{r['torch_ms']:>10.3f}{r['speedup']:>9.2f}{r['kv_mb']:>9.1f}"
              f"{r['cpp_kv_gb_s']:>8.1f}{r['frac_of_copy_bw']:>9.2f}")
    print(f"(copy bandwidth, read + write: {copy_bw / 1e9:.1f} GB/s; threads {torch.get_num_threads()}; "
          f"kernel ISA {cpp_backend.cpu_isa()})")


if __name__ == "__main__":
    main()
