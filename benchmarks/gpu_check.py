"""One GPU session's worth of kernel proof: correctness of every Triton kernel in bf16 and fp16 against
``fastinfer.ops.reference``, then a speed table. Under 6 minutes on an H200.

    python benchmarks/gpu_check.py            # on a CUDA GPU: checks + speed table; exit 1 on any failure
    python benchmarks/gpu_check.py --dry      # CPU, TRITON_INTERPRET=1, tiny shapes: same code paths, no claims
    python benchmarks/gpu_check.py --only decode

Speed (medians of CUDA-event timings, L2 flushed between repeats): decode attention's achieved KV GB/s over
the copy bandwidth measured here (large clone), paged decode vs torch SDPA on a contiguous cache of the same
shapes, prefill TFLOP/s vs torch SDPA (flash backend) and vs the bf16 matmul rate measured here, KV write
(store_kv) and block copy (copy_blocks) GB/s over the copy bandwidth. One JSON line per case, then a table.

Adding checks (int8/int4 matmuls, ...): decorate a function ``fn(ctx)`` with ``@check("name")`` (raise
AssertionError to fail) or ``@bench("name")`` (``ctx.emit(row)`` per case) here, or drop a file
``benchmarks/gpu_check_<topic>.py`` defining ``register(check, bench)``; it is loaded automatically.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import table as common_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHECKS: list[tuple[str, Callable[[Ctx], None]]] = []
BENCHES: list[tuple[str, Callable[[Ctx], None]]] = []


def check(name: str) -> Callable:
    """Register a correctness check ``fn(ctx)``; it fails by raising."""
    def deco(fn: Callable) -> Callable:
        CHECKS.append((name, fn))
        return fn
    return deco


def bench(name: str) -> Callable:
    """Register a speed case ``fn(ctx)`` that calls ``ctx.emit(row)``."""
    def deco(fn: Callable) -> Callable:
        BENCHES.append((name, fn))
        return fn
    return deco


@dataclass
class Ctx:
    """What every check and bench gets: device, dtypes to check, size scale, timing, and the result rows."""

    dry: bool
    device: str
    dtypes: list[Any]
    rows: list[dict] = field(default_factory=list)
    copy_gb_s: float = float("nan")
    matmul_tflop_s: float = float("nan")
    _flush: Any = None

    def size(self, gpu: int, dry: int) -> int:
        return dry if self.dry else gpu

    def time_ms(self, fn: Callable[[], Any], reps: int = 20, warmup: int = 3) -> float:
        """Median milliseconds of ``fn``; CUDA events on a GPU (L2 flushed before each repeat)."""
        import torch

        if self.dry:  # one run, wall clock: exercises the path, claims nothing
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        if self._flush is None:
            self._flush = torch.empty(256 << 20, dtype=torch.uint8, device=self.device)
        for _ in range(warmup):
            fn()
        events = []
        for _ in range(reps):
            self._flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events)

    def emit(self, row: dict) -> None:
        row = {**row, "dry": True} if self.dry else row
        self.rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)


# ------------------------------------------------------------------------------------------------ setup


def _setup_imports(dry: bool) -> None:
    """TRITON_INTERPRET before any Triton import in dry mode; make ``fastinfer.kernels`` importable from a
    plain checkout (the wheel maps it to the top-level ``kernels/`` folder)."""
    if dry:
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(ROOT))
    try:
        import fastinfer.kernels  # noqa: F401
    except ImportError:
        spec = importlib.util.spec_from_file_location("fastinfer.kernels", ROOT / "kernels" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "kernels")])
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["fastinfer.kernels"] = module
        spec.loader.exec_module(module)
        import fastinfer

        fastinfer.kernels = module  # type: ignore[attr-defined]


def _load_plugins() -> None:
    for path in sorted(Path(__file__).parent.glob("gpu_check_*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if hasattr(module, "register"):
            module.register(check, bench)


# ---------------------------------------------------------------------------------------------- helpers


def paged_case(ctx: Ctx, query_lens: list[int], seq_lens: list[int], num_heads: int, num_kv: int, head_dim: int,
               block_size: int, dtype, seed: int = 0, poison: bool = True):
    """q [T, H, D] and k/v caches with shuffled block ids; slots past each seq_len hold NaN when ``poison``."""
    import torch

    from fastinfer.ops import AttentionMetadata

    rng = random.Random(seed)
    torch.manual_seed(seed)
    need = [-(-s // block_size) for s in seq_lens]
    ids = list(range(sum(need) + 2))
    rng.shuffle(ids)
    block_ids, at = [], 0
    for n in need:
        block_ids.append(ids[at:at + n])
        at += n
    shape = (len(ids), block_size, num_kv, head_dim)  # [num_blocks, block_size, Hkv, D]
    if poison:
        k_cache = torch.full(shape, float("nan"), dtype=dtype, device=ctx.device)
        v_cache = torch.full(shape, float("nan"), dtype=dtype, device=ctx.device)
        full = AttentionMetadata.build(seq_lens, seq_lens, block_ids, block_size, ctx.device)
        n = sum(seq_lens)
        k_cache.view(-1, num_kv, head_dim)[full.slot_mapping] = torch.randn(n, num_kv, head_dim, device=ctx.device,
                                                                            dtype=dtype)
        v_cache.view(-1, num_kv, head_dim)[full.slot_mapping] = torch.randn(n, num_kv, head_dim, device=ctx.device,
                                                                            dtype=dtype)
    else:
        k_cache = torch.randn(shape, dtype=dtype, device=ctx.device)
        v_cache = torch.randn(shape, dtype=dtype, device=ctx.device)
    q = torch.randn(sum(query_lens), num_heads, head_dim, dtype=dtype, device=ctx.device)  # [T, H, D]
    meta = AttentionMetadata.build(query_lens, seq_lens, block_ids, block_size, ctx.device)
    return q, k_cache, v_cache, meta


def assert_close(name: str, out, ref) -> None:
    import torch

    tol = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}[ref.dtype]
    assert torch.isfinite(out).all(), f"{name}: non-finite output"
    err = (out.float() - ref.float()).abs().max().item() if out.numel() else 0.0
    bound = tol * (1 + ref.float().abs().max().item() if ref.numel() else 1)
    assert err <= bound, f"{name}: max abs error {err:.3g} > {bound:.3g}"


# ----------------------------------------------------------------------------------------------- checks

# (query_lens, seq_lens, H, Hkv, D, block_size, window, softcap): decode rows first
ATTENTION_CHECKS = {
    "mixed_gqa4_d128": ([1, 1, 1, 37, 64], [1, 300, 1025, 100, 64], 32, 8, 128, 16, None, None),
    "mixed_mqa_d64_window": ([1, 1, 90], [700, 33, 200], 8, 1, 64, 32, 128, None),
    "prefill_ctx_d96": ([1, 50], [129, 77], 12, 4, 96, 16, None, None),
    "prefill_d256": ([1, 70], [40, 70], 8, 4, 256, 16, None, None),
    "prefill_group7_d64": ([33], [65], 14, 2, 64, 8, None, None),
    "gemma2_softcap_window_d256": ([1, 1, 60], [900, 40, 300], 8, 4, 256, 16, 256, 1.5),
}
DRY_ATTENTION_CHECKS = {
    "mixed_gqa4_d64": ([1, 1, 9], [1, 40, 20], 8, 2, 64, 8, None, None),
    "mixed_mqa_d64_window": ([1, 5], [30, 20], 4, 1, 64, 16, 7, None),
    "softcap_window_d64": ([1, 6], [25, 20], 4, 2, 64, 8, 9, 1.5),
}


@check("paged_attention")
def check_paged_attention(ctx: Ctx) -> None:
    from fastinfer.ops import reference, triton_backend

    cases = DRY_ATTENTION_CHECKS if ctx.dry else ATTENTION_CHECKS
    for dtype in ctx.dtypes:
        for name, (ql, sl, h, hkv, d, bs, window, cap) in cases.items():
            q, kc, vc, meta = paged_case(ctx, ql, sl, h, hkv, d, bs, dtype)
            out = triton_backend.paged_attention(q, kc, vc, meta, d ** -0.5, window, cap)
            assert_close(f"{name}/{dtype}", out, reference.paged_attention(q, kc, vc, meta, d ** -0.5, window, cap))


@check("decode_split_kv")
def check_decode_split(ctx: Ctx) -> None:
    import torch
    from fastinfer.kernels.attention import paged_decode_triton

    from fastinfer.ops import reference

    slens = [1, 17, 100, 257] if ctx.dry else [1, 17, 1000, 4097]
    for dtype in ctx.dtypes:
        q, kc, vc, meta = paged_case(ctx, [1] * len(slens), slens, 16, 4, 64 if ctx.dry else 128, 16, dtype, 1)
        ref = reference.paged_attention(q, kc, vc, meta, 0.1)
        for splits in (1, 5):
            out = torch.empty_like(q)
            paged_decode_triton(q, kc, vc, out, meta.block_table, meta.seq_lens, max(slens), 0.1, None, splits)
            assert_close(f"splits={splits}/{dtype}", out, ref)


@check("store_kv+copy_blocks")
def check_cache_ops(ctx: Ctx) -> None:
    import torch

    from fastinfer.ops import reference, triton_backend

    for dtype in ctx.dtypes:
        kc = torch.full((12, 16, 4, 128), float("nan"), dtype=dtype, device=ctx.device)
        vc = kc.clone()
        kr, vr = kc.clone(), vc.clone()
        key, value = (torch.randn(37, 4, 128, dtype=dtype, device=ctx.device) for _ in range(2))
        slots = torch.randperm(12 * 16, device=ctx.device)[:37]
        slots[5] = -1
        triton_backend.store_kv(key, value, kc, vc, slots)
        reference.store_kv(key, value, kr, vr, slots)
        assert torch.equal(kc.nan_to_num(7.0), kr.nan_to_num(7.0)), f"store_kv k/{dtype}"
        assert torch.equal(vc.nan_to_num(7.0), vr.nan_to_num(7.0)), f"store_kv v/{dtype}"
        pairs = torch.tensor([[1, 4], [0, 9], [1, 11]], dtype=torch.int64, device=ctx.device)
        triton_backend.copy_blocks(kc, vc, pairs)
        reference.copy_blocks(kr, vr, pairs)
        assert torch.equal(kc.nan_to_num(7.0), kr.nan_to_num(7.0)), f"copy_blocks/{dtype}"


@check("norm+rotary+silu")
def check_small_ops(ctx: Ctx) -> None:
    import torch

    from fastinfer.ops import reference, triton_backend

    hidden = ctx.size(4096, 96)
    for dtype in ctx.dtypes:
        x, res = (torch.randn(9, hidden, dtype=dtype, device=ctx.device) for _ in range(2))
        w = torch.randn(hidden, dtype=dtype, device=ctx.device)
        assert_close(f"rms_norm/{dtype}", triton_backend.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6))
        out, s = triton_backend.fused_add_rms_norm(x, res, w, 1e-6)
        ref_out, ref_s = reference.fused_add_rms_norm(x, res, w, 1e-6)
        assert_close(f"fused_add_rms_norm/{dtype}", out, ref_out)
        assert_close(f"fused_add_rms_norm residual/{dtype}", s, ref_s)
        assert_close(f"silu_and_mul/{dtype}", triton_backend.silu_and_mul(x), reference.silu_and_mul(x))
        cos_sin = torch.randn(64, 128, device=ctx.device)  # [max_pos, rot]
        q = torch.randn(9, 32, 128, dtype=dtype, device=ctx.device)
        k = torch.randn(9, 8, 128, dtype=dtype, device=ctx.device)
        pos = torch.randint(0, 64, (9,), device=ctx.device)
        got, want = triton_backend.rotary_embedding(pos, q, k, cos_sin), reference.rotary_embedding(pos, q, k, cos_sin)
        assert_close(f"rotary q/{dtype}", got[0], want[0])
        assert_close(f"rotary k/{dtype}", got[1], want[1])


# ----------------------------------------------------------------------------------------------- speed


def measure_baselines(ctx: Ctx) -> None:
    """Copy bandwidth (read + write bytes of a large clone) and the bf16 matmul rate, for the ratios."""
    import torch

    n = ctx.size(2 << 30, 1 << 20)
    src = torch.empty(n // 2, dtype=torch.bfloat16, device=ctx.device).normal_()
    ms = ctx.time_ms(lambda: src.clone(), reps=10)
    ctx.copy_gb_s = 2 * n / ms / 1e6
    m = ctx.size(8192, 64)
    a, b = (torch.randn(m, m, dtype=torch.bfloat16, device=ctx.device) for _ in range(2))
    ms = ctx.time_ms(lambda: a @ b, reps=10)
    ctx.matmul_tflop_s = 2 * m ** 3 / ms / 1e9
    ctx.emit({"case": "baseline", "copy_gb_s": ctx.copy_gb_s, "bf16_matmul_tflop_s": ctx.matmul_tflop_s})


def pick_sdpa(q, k, v, causal: bool) -> tuple[Callable[[], Any], str]:
    """torch SDPA with native GQA on the first backend that takes these inputs (flash, memory-efficient,
    cuDNN, then math). Returns (a call with that backend pinned, its name)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):
        def call(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        try:
            call()
        except RuntimeError:
            continue
        return call, backend.name.lower()
    raise RuntimeError("no SDPA backend accepted the inputs")


# (batch, context) per case; model shape Llama-3-8B-like: H=32, Hkv=8, D=128, bf16, block 16
DECODE_CASES = [(1, 8192), (16, 2048), (64, 4096), (256, 1024)]
PREFILL_CASES = [(1, 2048), (1, 8192), (4, 4096)]
HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16


def _dtype(ctx: Ctx):
    import torch

    return torch.float16 if ctx.dry else torch.bfloat16  # bf16 dot is wrong in the interpreter


@bench("decode")
def bench_decode(ctx: Ctx) -> None:
    import torch

    from fastinfer.ops import triton_backend

    cases = [(2, 40), (3, 70)] if ctx.dry else DECODE_CASES
    h, hkv, d = (4, 2, 64) if ctx.dry else (HEADS, KV_HEADS, HEAD_DIM)
    for b, ctx_len in cases:
        q, kc, vc, meta = paged_case(ctx, [1] * b, [ctx_len] * b, h, hkv, d, BLOCK, _dtype(ctx), poison=False)
        t_paged = ctx.time_ms(lambda: triton_backend.paged_attention(q, kc, vc, meta, d ** -0.5))  # noqa: B023
        kv_bytes = 2 * b * ctx_len * hkv * d * kc.element_size()
        qc = q.view(b, h, 1, d)  # [B, H, 1, D]
        kcont = torch.randn(b, hkv, ctx_len, d, dtype=q.dtype, device=ctx.device)  # [B, Hkv, L, D]
        vcont = torch.randn_like(kcont)
        contig, backend = pick_sdpa(qc, kcont, vcont, causal=False)
        t_contig = ctx.time_ms(contig)
        gb_s = kv_bytes / t_paged / 1e6
        ctx.emit({"case": f"decode B={b} ctx={ctx_len}", "triton_ms": t_paged, "kv_gb_s": gb_s,
                  "frac_of_copy": gb_s / ctx.copy_gb_s, "sdpa_contig_ms": t_contig, "sdpa_backend": backend,
                  "paged_vs_contig": t_contig / t_paged})


@bench("prefill")
def bench_prefill(ctx: Ctx) -> None:
    import torch
    from fastinfer.kernels.attention import attention_flops

    from fastinfer.ops import triton_backend

    cases = [(1, 33), (2, 20)] if ctx.dry else PREFILL_CASES
    h, hkv, d = (4, 2, 64) if ctx.dry else (HEADS, KV_HEADS, HEAD_DIM)
    for b, n in cases:
        q, kc, vc, meta = paged_case(ctx, [n] * b, [n] * b, h, hkv, d, BLOCK, _dtype(ctx), poison=False)
        flops = attention_flops(meta, h, d)
        t_tri = ctx.time_ms(lambda: triton_backend.paged_attention(q, kc, vc, meta, d ** -0.5))  # noqa: B023
        qs = q.view(b, n, h, d).transpose(1, 2)  # [B, H, L, D]
        ks = torch.randn(b, hkv, n, d, dtype=q.dtype, device=ctx.device)  # [B, Hkv, L, D]
        vs = torch.randn_like(ks)
        dense, backend = pick_sdpa(qs, ks, vs, causal=True)
        t_sdpa = ctx.time_ms(dense)
        tf = flops / t_tri / 1e9
        ctx.emit({"case": f"prefill B={b} L={n}", "triton_ms": t_tri, "tflop_s": tf, "sdpa_ms": t_sdpa,
                  "sdpa_backend": backend, "sdpa_tflop_s": flops / t_sdpa / 1e9, "vs_sdpa": t_sdpa / t_tri,
                  "frac_of_matmul": tf / ctx.matmul_tflop_s})
    # chunked prefill: a chunk after a long context (no SDPA equivalent without a bottom-right mask)
    qlen, slen = (9, 40) if ctx.dry else (1024, 8192)
    q, kc, vc, meta = paged_case(ctx, [qlen] * 2, [slen] * 2, h, hkv, d, BLOCK, _dtype(ctx), poison=False)
    t = ctx.time_ms(lambda: triton_backend.paged_attention(q, kc, vc, meta, d ** -0.5))
    tf = attention_flops(meta, h, d) / t / 1e9
    ctx.emit({"case": f"chunk B=2 q={qlen} ctx={slen}", "triton_ms": t, "tflop_s": tf,
              "frac_of_matmul": tf / ctx.matmul_tflop_s})


@bench("kv_write")
def bench_kv_write(ctx: Ctx) -> None:
    import torch

    from fastinfer.ops import triton_backend

    hkv, d, dtype = KV_HEADS, HEAD_DIM, _dtype(ctx)
    tokens = ctx.size(65536, 64)
    num_blocks = tokens // BLOCK * 2
    kc = torch.zeros(num_blocks, BLOCK, hkv, d, dtype=dtype, device=ctx.device)  # [NB, bs, Hkv, D]
    vc = torch.zeros_like(kc)
    key, value = (torch.randn(tokens, hkv, d, dtype=dtype, device=ctx.device) for _ in range(2))
    slots = torch.randperm(num_blocks * BLOCK, device=ctx.device)[:tokens]
    t = ctx.time_ms(lambda: triton_backend.store_kv(key, value, kc, vc, slots))
    gb_s = 2 * 2 * key.numel() * key.element_size() / t / 1e6  # k and v, read + write
    ctx.emit({"case": f"store_kv T={tokens}", "triton_ms": t, "gb_s": gb_s, "frac_of_copy": gb_s / ctx.copy_gb_s})
    pairs = torch.stack([torch.arange(0, num_blocks // 2), torch.arange(num_blocks // 2, num_blocks)], 1)
    pairs = pairs.to(ctx.device)  # [N, 2]: first half onto second half
    t = ctx.time_ms(lambda: triton_backend.copy_blocks(kc, vc, pairs))
    gb_s = 2 * 2 * (num_blocks // 2) * kc[0].numel() * kc.element_size() / t / 1e6
    ctx.emit({"case": f"copy_blocks N={num_blocks // 2}", "triton_ms": t, "gb_s": gb_s,
              "frac_of_copy": gb_s / ctx.copy_gb_s})


# ------------------------------------------------------------------------------------------------- main


def table(rows: list[dict]) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols and c != "dry"]
    return common_table(rows, cols)


def run(ctx: Ctx, only: str | None, skip_bench: bool) -> int:
    failures = 0
    for name, fn in CHECKS:
        if only and only not in name:
            continue
        t = time.perf_counter()
        try:
            fn(ctx)
            print(f"CHECK {name}: PASS ({time.perf_counter() - t:.1f}s)", flush=True)
        except Exception as e:  # report every failing check, keep going
            failures += 1
            print(f"CHECK {name}: FAIL {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
    if skip_bench:
        return failures
    measure_baselines(ctx)
    for name, fn in BENCHES:
        if only and only not in name:
            continue
        try:
            fn(ctx)
        except Exception as e:
            failures += 1
            print(f"BENCH {name}: ERROR {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
    return failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry", action="store_true", help="CPU + TRITON_INTERPRET=1, tiny shapes, correctness only")
    ap.add_argument("--only", help="run only checks/benches whose name contains this")
    ap.add_argument("--no-bench", action="store_true", help="correctness checks only")
    args = ap.parse_args(argv)
    _setup_imports(args.dry)
    import torch
    import triton

    if not args.dry and not torch.cuda.is_available():
        print("no CUDA GPU: run with --dry for the CPU interpreter path", file=sys.stderr)
        return 2
    _load_plugins()
    device = "cpu" if args.dry else "cuda"
    ctx = Ctx(dry=args.dry, device=device,
              dtypes=[torch.float16] if args.dry else [torch.bfloat16, torch.float16])
    name = "CPU (Triton interpreter, DRY RUN: timings are not claims)" if args.dry else torch.cuda.get_device_name()
    print(f"# gpu_check {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')} on {name}; "
          f"torch {torch.__version__}, triton {triton.__version__}", flush=True)
    t0 = time.perf_counter()
    failures = run(ctx, args.only, args.no_bench)
    if ctx.rows:
        print("\n" + table(ctx.rows))
    print(f"\n{'FAILED' if failures else 'OK'}: {failures} failure(s) in {time.perf_counter() - t0:.0f}s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
