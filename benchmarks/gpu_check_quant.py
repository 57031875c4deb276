"""gpu_check plugin: weight-only int8 / int4 ``quant_linear`` (kernels/quant.py). Loaded by benchmarks/gpu_check.py.

Check ``quant_linear``: the Triton op against ``fastinfer.ops.reference`` in bf16 and fp16, int8 (per channel, and
GGUF Q8_0-style group 32) and int4 (groups 128 and 32), M from 1 (GEMV) through 16 (split-K dot) and 64 (GEMM) to
256 (the large-M fallback, and the fused GEMM forced at that size).

Bench ``quant_gemv`` (M = 1, Llama-3-8B shapes, N x K): time of the op vs torch bf16 ``F.linear`` on the same shape,
achieved GB/s of the quantized bytes (qweight + scales + mins) against the copy bandwidth measured by gpu_check;
targets printed beside the ratio: int4 >= 3x, int8 >= 1.8x. On the down-projection shape a few GEMV block configs
are timed too (``sweep``), to tune the defaults from data. Bench ``quant_gemm`` (M = 16, 64, 256): the op as the
launcher runs it (``path``), the fused kernel and the dequantize + matmul fallback, each vs bf16; target at 256:
>= 1.0x. ``--dry``: tiny shapes under the interpreter, same code paths, no claims.
"""
from __future__ import annotations

from typing import Any

TARGETS = {4: 3.0, 8: 1.8}  # M = 1 speedup over bf16 F.linear: the weight bytes shrink 4x / 2x
# (N, K): gate/up projection, down projection, a square attention projection
GEMV_SHAPES = [(14336, 4096), (4096, 14336), (4096, 4096)]
DRY_GEMV_SHAPES = [(48, 256), (40, 384)]
GEMM_MS = (16, 64, 256)
BENCH_FORMATS = [("int4-g128", 4, 128), ("int8-perchannel", 8, None)]  # (name, bits, group size or per channel)


def _weight(ctx: Any, n: int, k: int, bits: int, group: int | None, seed: int = 0):
    """(qweight, scales, mins, group_size) of an RTN-quantized random [N, K] weight on the device; int4 scales and
    mins in fp16 (as GGUF and GPTQ-style checkpoints store them), int8 per-channel scales fp32."""
    import torch

    from fastinfer.quantization import quantize

    g = torch.Generator(device=ctx.device).manual_seed(seed)
    w = torch.randn(n, k, device=ctx.device, generator=g) * 0.02  # [N, K]
    qw = quantize(w, "int8" if bits == 8 else "int4", group)
    if bits == 4:
        assert qw.mins is not None
        return qw.qweight, qw.scales.half(), qw.mins.half(), qw.group_size
    return qw.qweight, qw.scales, qw.mins, qw.group_size


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _assert_close(name: str, out, ref) -> None:
    """gpu_check's rule: max abs error within the dtype's tolerance times (1 + max |ref|)."""
    import torch

    tol = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}[ref.dtype]
    assert out.shape == ref.shape and out.dtype == ref.dtype, f"{name}: {out.shape} {out.dtype} vs {ref.shape}"
    assert torch.isfinite(out).all(), f"{name}: non-finite output"
    err = (out.float() - ref.float()).abs().max().item()
    bound = tol * (1 + ref.float().abs().max().item())
    assert err <= bound, f"{name}: max abs error {err:.3g} > {bound:.3g}"


def check_quant_linear(ctx: Any) -> None:
    import torch
    from fastinfer.kernels import quant as Q

    from fastinfer.ops import reference, triton_backend

    n = ctx.size(1000, 40)
    formats = [("int8-perchannel", 8, None), ("int4-g128", 4, 128), ("int8-g32", 8, 32), ("int4-g32", 4, 32)]
    ms = (1, 5, 16, 64, 256) if not ctx.dry else (1, 5, 33)
    for dtype in ctx.dtypes:
        for f, (name, bits, group) in enumerate(formats):
            if f >= 2 and dtype != ctx.dtypes[0]:  # the group-32 formats in the first dtype only (compile time)
                continue
            k = ctx.size(4096, 256)
            qweight, scales, mins, g = _weight(ctx, n, k, bits, group, seed=f)
            bias = torch.randn(n, device=ctx.device, dtype=dtype) if f == 1 else None
            for m in ms:
                x = torch.randn(m, k, device=ctx.device, dtype=dtype)  # [M, K]
                ref = reference.quant_linear(x, qweight, scales, mins, bits, g, bias)
                tag = f"{name}/M={m}/{dtype}"
                _assert_close(tag, triton_backend.quant_linear(x, qweight, scales, mins, bits, g, bias), ref)
                if Q.select_path(m, x.device) == "fallback":  # the fused GEMM at that size too
                    _assert_close(tag + "/fused", Q.quant_linear(x, qweight, scales, mins, bits, g, bias,
                                                                 fallback_min_m=0), ref)


def bench_quant_gemv(ctx: Any) -> None:
    import torch
    import torch.nn.functional as F
    from fastinfer.kernels import quant as Q

    from fastinfer.quantization import dequantize

    dtype = torch.float16 if ctx.dry else torch.bfloat16  # the interpreter's bf16 dot is wrong
    for n, k in DRY_GEMV_SHAPES if ctx.dry else GEMV_SHAPES:
        x = torch.randn(1, k, device=ctx.device, dtype=dtype)  # [1, K]
        for s, (name, bits, group) in enumerate(BENCH_FORMATS):
            qweight, scales, mins, g = _weight(ctx, n, k, bits, group, seed=s)
            w = dequantize(qweight, scales, mins, bits, g).to(dtype)  # [N, K] the bf16 model's weight
            t_q = ctx.time_ms(lambda: Q.quant_linear(x, qweight, scales, mins, bits, g))  # noqa: B023
            t_bf16 = ctx.time_ms(lambda: F.linear(x, w))  # noqa: B023
            gb_s = _nbytes(qweight, scales, mins) / t_q / 1e6
            cfg = Q.gemv_config(n, k, bits, g, x.device)
            assert cfg is not None
            row = {"case": f"quant_gemv {name} M=1 {n}x{k}", "triton_ms": t_q, "bf16_ms": t_bf16,
                   "vs_bf16": t_bf16 / t_q, "target": f">={TARGETS[bits]}x", "meets": t_bf16 / t_q >= TARGETS[bits],
                   "gb_s": gb_s, "frac_of_copy": gb_s / ctx.copy_gb_s,
                   "config": f"bn{cfg.block_n} bk{cfg.block_k} w{cfg.num_warps} split{cfg.split_k}"}
            if (n, k) == (4096, 14336) or ctx.dry and s == 0:
                row.update(_sweep(ctx, x, qweight, scales, mins, bits, g))
            ctx.emit(row)


def _sweep(ctx: Any, x, qweight, scales, mins, bits: int, g: int) -> dict:
    """A few GEMV block configs beside the default one; returns the fastest as ``sweep_best``."""
    from fastinfer.kernels import quant as Q

    n, k = qweight.shape[0], x.shape[-1]
    wide = 512 if bits == 4 else 256  # twice the default BLOCK_K
    trials = [(16, wide, 4, None), (64, wide // 2, 4, None), (32, wide // 2, 4, 1)]  # 1: no split-K
    results = []
    for bn, bk, warps, split in trials[:1] if ctx.dry else trials:
        cfg = Q.gemv_config(n, k, bits, g, x.device, split, block_n=bn, block_k=bk, num_warps=warps)
        if cfg is None:
            continue
        t = ctx.time_ms(lambda: Q.quant_linear(x, qweight, scales, mins, bits, g, config=cfg))  # noqa: B023
        results.append((t, f"bn{bn} bk{bk} w{warps} split{cfg.split_k}"))
    t, label = min(results)
    return {"sweep_best": label, "sweep_best_ms": t}


def bench_quant_gemm(ctx: Any) -> None:
    import torch
    import torch.nn.functional as F
    from fastinfer.kernels import quant as Q

    dtype = torch.float16 if ctx.dry else torch.bfloat16
    n, k = (48, 256) if ctx.dry else (14336, 4096)
    for s, (name, bits, group) in enumerate(BENCH_FORMATS):
        qweight, scales, mins, g = _weight(ctx, n, k, bits, group, seed=s)
        w = Q.dequantize(qweight, scales, mins, bits, g, dtype)  # [N, K]
        for m in (3, 16, 33) if ctx.dry else GEMM_MS:
            x = torch.randn(m, k, device=ctx.device, dtype=dtype)  # [M, K]
            path = Q.select_path(m, x.device)
            t_auto = ctx.time_ms(lambda: Q.quant_linear(x, qweight, scales, mins, bits, g))  # noqa: B023
            t_fused = ctx.time_ms(lambda: Q.quant_linear(x, qweight, scales, mins, bits, g,  # noqa: B023
                                                         fallback_min_m=0))
            t_fall = ctx.time_ms(lambda: Q.quant_linear(x, qweight, scales, mins, bits, g,  # noqa: B023
                                                        fallback_min_m=1))
            t_bf16 = ctx.time_ms(lambda: F.linear(x, w))  # noqa: B023
            row = {"case": f"quant_gemm {name} M={m} {n}x{k}", "path": path, "triton_ms": t_auto, "bf16_ms": t_bf16,
                   "vs_bf16": t_bf16 / t_auto, "fused_vs_bf16": t_bf16 / t_fused, "fallback_vs_bf16": t_bf16 / t_fall,
                   "tflop_s": 2 * m * n * k / t_auto / 1e9}
            if m == 256:
                row.update({"target": ">=1.0x", "meets": t_bf16 / t_auto >= 1.0})
            ctx.emit(row)


def register(check, bench) -> None:
    """Called by gpu_check.py: one correctness check, two speed cases."""
    check("quant_linear")(check_quant_linear)
    bench("quant_gemv")(bench_quant_gemv)
    bench("quant_gemm")(bench_quant_gemm)
