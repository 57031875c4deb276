"""gpu_check plugin: the Triton ``fused_moe`` (kernels/moe.py). Loaded by benchmarks/gpu_check.py.

Check ``fused_moe``: the Triton op against ``fastinfer.ops.reference.fused_moe`` in bf16 and fp16 at decode
(T = 1), odd and prefill token counts, 8 and 64 experts, top-k 1 / 2 / 8, hidden and intermediate sizes that are
no multiple of a block, and a routing that leaves half the experts empty; then int8 (per channel) and int4 (group
32, with mins) weight-only experts against the reference over the same quantized experts.

Bench ``moe`` (Mixtral-like proportions scaled down: H = 2048, I = 7168, E = 8, k = 2, bf16) at batch 1, 16 and
64: the op vs the reference loop over experts and vs a dense SwiGLU MLP of the same active size (intermediate
k * I); GB/s of the active experts' weight bytes (each distinct routed expert's w13 and w2 once) against the
copy bandwidth measured by gpu_check; rows ``moe-int8`` / ``moe-int4`` for quantized experts (GB/s of their
own bytes). ``--dry``: tiny shapes under the interpreter, same code paths, no claims.
"""
from __future__ import annotations

from typing import Any

# (T, E, k, H, I, routing)
CHECKS = [(1, 8, 2, 1000, 360, "random"), (7, 64, 8, 520, 200, "skewed"), (33, 8, 1, 4096, 1408, "random"),
          (257, 8, 2, 1000, 360, "skewed"), (1024, 64, 8, 512, 136, "random"), (16, 64, 8, 1024, 512, "skewed")]
DRY_CHECKS = [(1, 8, 2, 72, 40, "random"), (9, 4, 1, 40, 24, "skewed"), (5, 8, 2, 96, 64, "skewed")]
BENCH_SHAPE = (2048, 7168, 8, 2)  # H, I, E, k
DRY_BENCH_SHAPE = (96, 64, 8, 2)  # multiples of 32: int4 groups of 32
BATCHES = (1, 16, 64)


def moe_inputs(ctx: Any, t: int, e: int, k: int, h: int, i: int, dtype, routing: str = "random", seed: int = 0):
    """(x, w13, w2, topk_weights, topk_ids) on the device; ``skewed`` routes to the even experts only."""
    import torch

    g = torch.Generator(device=ctx.device).manual_seed(seed)
    x = torch.randn(t, h, device=ctx.device, generator=g).to(dtype)
    w13 = (torch.randn(e, 2 * i, h, device=ctx.device, generator=g) / h ** 0.5).to(dtype)
    w2 = (torch.randn(e, h, i, device=ctx.device, generator=g) / i ** 0.5).to(dtype)
    scores = torch.randn(t, e, device=ctx.device, generator=g)
    if routing == "skewed" and k <= e // 2:
        scores[:, 1::2] = -1e9
    vals, ids = scores.topk(k, dim=1)
    return x, w13, w2, vals.softmax(dim=1), ids.to(torch.int32)


def quantized(w, bits: int):
    """Stacked int8 (per channel) / int4 (group 32) experts of float experts [E, N, K], on their device."""
    from fastinfer.quantization.format import QuantizedExperts
    from fastinfer.quantization.rtn import quantize_int4, quantize_int8

    return QuantizedExperts.stack([quantize_int8(w[e].float()) if bits == 8 else
                                   quantize_int4(w[e].float(), 32, search=False) for e in range(w.shape[0])])


def quantized_args(case, bits: int):
    """The (x, w13, w2, weights, ids, scales / mins ...) arguments with both projections quantized."""
    x, w13, w2, wts, ids = case
    q13, q2 = quantized(w13, bits), quantized(w2, bits)
    return (x, q13.qweight, q2.qweight, wts, ids, q13.scales, q13.mins, q2.scales, q2.mins), q13.nbytes + q2.nbytes


def check_fused_moe(ctx: Any) -> None:
    from gpu_check import assert_close

    from fastinfer.ops import reference, triton_backend

    for dtype in ctx.dtypes:
        for t, e, k, h, i, routing in DRY_CHECKS if ctx.dry else CHECKS:
            case = moe_inputs(ctx, t, e, k, h, i, dtype, routing, seed=t + e)
            out = triton_backend.fused_moe(*case)
            assert out.shape == (t, h) and out.dtype == dtype, f"fused_moe: {out.shape} {out.dtype}"
            assert_close(f"fused_moe T={t} E={e} k={k} H={h} I={i} {routing}/{dtype}", out,
                         reference.fused_moe(*case))
            if h % 32 or i % 32:
                continue
            for bits in (8, 4):
                qargs, _ = quantized_args(case, bits)
                assert_close(f"fused_moe int{bits} T={t} E={e} k={k} H={h} I={i} {routing}/{dtype}",
                             triton_backend.fused_moe(*qargs), reference.fused_moe(*qargs))


def bench_moe(ctx: Any) -> None:
    import torch
    import torch.nn.functional as F

    from fastinfer.ops import reference, triton_backend

    dtype = torch.float16 if ctx.dry else torch.bfloat16  # the interpreter's bf16 dot is wrong
    h, i, e, k = DRY_BENCH_SHAPE if ctx.dry else BENCH_SHAPE
    for b in BATCHES:
        x, w13, w2, wts, ids = moe_inputs(ctx, b, e, k, h, i, dtype, seed=b)
        dense_up = torch.randn(2 * k * i, h, device=ctx.device, dtype=dtype) / h ** 0.5  # the active size, dense
        dense_down = torch.randn(h, k * i, device=ctx.device, dtype=dtype) / (k * i) ** 0.5

        def dense(x=x, up=dense_up, down=dense_down):
            gu = F.linear(x, up)
            return F.linear(F.silu(gu[:, :k * i]) * gu[:, k * i:], down)

        t_tri = ctx.time_ms(lambda: triton_backend.fused_moe(x, w13, w2, wts, ids))  # noqa: B023
        t_ref = ctx.time_ms(lambda: reference.fused_moe(x, w13, w2, wts, ids), reps=5)  # noqa: B023
        t_dense = ctx.time_ms(dense)
        active = ids.unique().numel()
        gb_s = active * 3 * h * i * w13.element_size() / t_tri / 1e6
        ctx.emit({"case": f"moe B={b} H={h} I={i} E={e} k={k}", "triton_ms": t_tri, "reference_ms": t_ref,
                  "vs_reference": t_ref / t_tri, "dense_active_ms": t_dense, "vs_dense": t_dense / t_tri,
                  "active_experts": active, "weight_gb_s": gb_s, "frac_of_copy": gb_s / ctx.copy_gb_s})
        for bits in (8, 4):
            qargs, nbytes = quantized_args((x, w13, w2, wts, ids), bits)
            t_q = ctx.time_ms(lambda qargs=qargs: triton_backend.fused_moe(*qargs))
            q_gb_s = active / e * nbytes / t_q / 1e6
            ctx.emit({"case": f"moe-int{bits} B={b} H={h} I={i} E={e} k={k}", "triton_ms": t_q,
                      "vs_bf16": t_tri / t_q, "active_experts": active, "weight_gb_s": q_gb_s,
                      "frac_of_copy": q_gb_s / ctx.copy_gb_s})


def register(check, bench) -> None:
    check("fused_moe")(check_fused_moe)
    bench("moe")(bench_moe)
