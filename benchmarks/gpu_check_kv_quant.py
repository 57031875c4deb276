"""gpu_check plugin: the Triton kernels on a quantized KV cache (int8 and fp8 e4m3 rows ``[..., D + 2]`` with an fp16
scale per token and KV head, ``fastinfer.ops.reference.quantize_kv_rows``). Loaded by benchmarks/gpu_check.py.

Check ``kv_quant``: ``store_kv`` into int8 / fp8 caches is bit-exact with the reference (extreme rows included),
then ``paged_attention`` (decode rows through the split-KV kernel, prefill rows through the varlen kernel) on those
caches against the reference in every checked dtype, unwritten slots poisoned with 0x7F bytes (a NaN scale).

Bench ``decode_kv_quant``: decode attention at long contexts (Llama-8B heads: 32 / 8, D 128, block 16), bf16 vs
int8 vs fp8 caches: ms, the bytes each reads (codes + scales for the quantized ones) as GB/s and as a fraction of
the copy bandwidth gpu_check measured, and the speed-up over bf16. ``--dry``: tiny shapes under the interpreter.
"""
from __future__ import annotations

from typing import Any

KINDS = ("int8", "fp8_e4m3")
# (query_lens, seq_lens, H, Hkv, D, block_size, window)
CHECKS = {
    "mixed_gqa4_d128": ([1, 1, 1, 37], [1, 300, 1025, 100], 32, 8, 128, 16, None),
    "mixed_gqa3_d64_window": ([1, 1, 90], [700, 33, 200], 9, 3, 64, 32, 128),
}
DRY_CHECKS = {"mixed_gqa2_d64": ([1, 1, 9], [1, 40, 20], 4, 2, 64, 8, None)}
BENCH_CASES = [(1, 16384), (16, 4096), (64, 4096)]
DRY_BENCH_CASES = [(2, 40)]


def quantized_case(ctx: Any, query_lens, seq_lens, num_heads, num_kv, head_dim, block_size, dtype, kind: str,
                   poison: bool = True):
    """gpu_check's paged case with its caches quantized row by row by the reference; the slots it poisoned
    with NaN hold 0x7F bytes (a NaN fp16 scale) instead."""
    import torch
    from gpu_check import paged_case

    from fastinfer.ops import reference

    q, k_cache, v_cache, meta = paged_case(ctx, query_lens, seq_lens, num_heads, num_kv, head_dim, block_size,
                                           dtype, poison=poison)

    def quantize(cache):
        rows = reference.quantize_kv_rows(cache, kind)
        rows[torch.isnan(cache).all(dim=-1)] = 0x7F
        return rows

    return q, quantize(k_cache), quantize(v_cache), meta


def check_kv_quant(ctx: Any) -> None:
    import torch
    from gpu_check import assert_close

    from fastinfer.ops import reference, triton_backend

    t, hkv, d = 37, 8, 128
    for kind in KINDS:
        cache_dtype = torch.int8 if kind == "int8" else torch.uint8
        for dtype in ctx.dtypes:
            key = torch.randn(t, hkv, d, device=ctx.device).to(dtype)
            value = torch.randn(t, hkv, d, device=ctx.device).to(dtype)
            key[1] = 1.0e4  # all large
            key[2] = 0.0  # all zero: the smallest scale, never 0
            value[3, 0, 5] = float("nan")
            slots = torch.randperm(8 * 16, device=ctx.device)[:t]
            slots[4] = -1
            kc = torch.full((8, 16, hkv, d + 2), 0x7F, dtype=cache_dtype, device=ctx.device)
            vc = kc.clone()
            triton_backend.store_kv(key, value, kc, vc, slots)
            kr_cpu, vr_cpu = torch.full_like(kc, 0x7F).cpu(), torch.full_like(vc, 0x7F).cpu()
            reference.store_kv(key.cpu(), value.cpu(), kr_cpu, vr_cpu, slots.cpu())
            assert torch.equal(kc.cpu(), kr_cpu) and torch.equal(vc.cpu(), vr_cpu), f"store_kv {kind}/{dtype}"
            for name, (ql, sl, h, nkv, hd, bs, window) in (DRY_CHECKS if ctx.dry else CHECKS).items():
                q, k_cache, v_cache, meta = quantized_case(ctx, ql, sl, h, nkv, hd, bs, dtype, kind)
                out = triton_backend.paged_attention(q, k_cache, v_cache, meta, hd ** -0.5, window)
                ref = reference.paged_attention(q, k_cache, v_cache, meta, hd ** -0.5, window)
                assert_close(f"{name}/{kind}/{dtype}", out, ref)


def bench_decode_kv_quant(ctx: Any) -> None:
    import torch
    from gpu_check import HEAD_DIM, HEADS, KV_HEADS, _dtype, paged_case

    from fastinfer.ops import triton_backend

    h, hkv, d, bs = (4, 2, 64, 8) if ctx.dry else (HEADS, KV_HEADS, HEAD_DIM, 16)
    dtype = _dtype(ctx)
    for b, ctx_len in (DRY_BENCH_CASES if ctx.dry else BENCH_CASES):
        q, kc, vc, meta = paged_case(ctx, [1] * b, [ctx_len] * b, h, hkv, d, bs, dtype, poison=False)
        t_float = ctx.time_ms(lambda: triton_backend.paged_attention(q, kc, vc, meta, d ** -0.5))  # noqa: B023
        float_bytes = 2 * b * ctx_len * hkv * d * kc.element_size()
        row: dict[str, Any] = {"case": f"decode_kv_quant B={b} ctx={ctx_len}", "bf16_ms": t_float,
                               "bf16_frac_of_copy": float_bytes / t_float / 1e6 / ctx.copy_gb_s}
        for kind in KINDS:
            q, kq, vq, meta = quantized_case(ctx, [1] * b, [ctx_len] * b, h, hkv, d, bs, dtype, kind, poison=False)
            t_q = ctx.time_ms(lambda: triton_backend.paged_attention(q, kq, vq, meta, d ** -0.5))  # noqa: B023
            q_bytes = 2 * b * ctx_len * hkv * (d + 2)
            row[f"{kind}_ms"] = t_q
            row[f"{kind}_frac_of_copy"] = q_bytes / t_q / 1e6 / ctx.copy_gb_s
            row[f"{kind}_speedup"] = t_float / t_q
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        ctx.emit(row)


def register(check, bench) -> None:
    check("kv_quant")(check_kv_quant)
    bench("decode_kv_quant")(bench_decode_kv_quant)
