"""gpu_check plugin: the CUDA C++ kernels (csrc/cuda/, fastinfer.ops.cuda_backend). Loaded by benchmarks/gpu_check.py.

On a GPU, when the install lacks the CUDA tier, ``register`` builds it first (``setup.py build_ext --inplace`` with
FASTINFER_BUILD_EXT=1 for this GPU's architecture only, ninja when it is there (else setuptools compiles one file
at a time: may not fit); at most BUILD_TIMEOUT_S; before any check has loaded fastinfer._C) and says how long it
took or why it failed.

Check ``cuda_kernels``: tests/ops/test_cuda_kernels.py (every CUDA op against ``fastinfer.ops.reference``) in
process. Bench ``cuda_decode``: paged decode at long context on a Llama-3-8B layer (H 32, Hkv 8, D 128, bf16,
blocks of 16): the CUDA op vs the Triton op vs the torch backend vs flash-attn's ``flash_attn_with_kvcache`` (when
importable; its paged cache needs blocks of a multiple of 256, so it gets its own cache with blocks of 256), the
achieved KV GB/s over the copy bandwidth (target >= 0.85). Bench ``cuda_gemv``: int4 (g128, fp16 scales) and int8
(per channel) ``quant_linear`` at M = 1 on the 8B shapes vs bf16 ``F.linear`` (targets: int4 >= 3x, int8 >= 1.8x)
and vs the Triton op. ``--dry``: no CUDA tier on the CPU, so the check says so and the benches emit nothing.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT_S = 240
DECODE_CASES = [(1, 8192), (1, 32768), (16, 4096), (64, 2048)]  # (batch, context)
GEMV_SHAPES = [(14336, 4096), (4096, 14336), (4096, 4096)]  # (N, K)
GEMV_TARGETS = {4: 3.0, 8: 1.8}
_STATUS = {"cuda": "not checked"}


def _tier_status() -> str:
    """compiled_tiers()['cuda'] from a fresh interpreter (this one must not load fastinfer._C before a build)."""
    code = "from fastinfer.ops.registry import compiled_tiers; print(compiled_tiers()['cuda'])"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    return proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 and proc.stdout.strip() else proc.stderr[-500:]


def ensure_cuda_tier() -> str:
    """Build fastinfer._C / _C_cuda in place when the CUDA tier is missing; returns compiled_tiers()['cuda']."""
    import torch

    status = _tier_status()
    if status == "built" or torch.version.cuda is None:
        return status
    major, minor = torch.cuda.get_device_capability()
    env = {**os.environ, "FASTINFER_BUILD_EXT": "1", "TORCH_CUDA_ARCH_LIST": f"{major}.{minor}",
           "MAX_JOBS": str(os.cpu_count() or 4)}
    ninja = shutil.which("ninja") is not None
    print(f"# gpu_check_cuda: building the CUDA tier ({status}); sm_{major}{minor}, ninja "
          f"{'found' if ninja else 'MISSING (serial setuptools build)'}", flush=True)
    t = time.perf_counter()
    try:
        # one extension after the other (no -j): torch's BuildExtension writes each one's build.ninja into the same
        # build directory
        proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"not built (the build ran past {BUILD_TIMEOUT_S} s)"
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        print(f"# gpu_check_cuda: BUILD FAILED\n{tail}", flush=True)
        return "not built (the build failed; log above)"
    print(f"# gpu_check_cuda: built in {time.perf_counter() - t:.0f} s", flush=True)
    return _tier_status()


def check_cuda_kernels(ctx: Any) -> None:
    if ctx.dry:
        print(f"# cuda_kernels: dry run, no CUDA tier on the CPU ({_STATUS['cuda']}): nothing checked", flush=True)
        return
    assert _STATUS["cuda"] == "built", f"CUDA kernels: {_STATUS['cuda']}"
    import pytest

    rc = pytest.main(["-q", "-x", "-p", "no:cacheprovider", str(ROOT / "tests" / "ops" / "test_cuda_kernels.py")])
    assert rc == 0, f"tests/ops/test_cuda_kernels.py failed (pytest exit code {rc})"


def _flash_attn_decode(ctx: Any, q, b: int, ctx_len: int, hkv: int, d: int):
    """A call of flash_attn_with_kvcache on its own paged cache (blocks of 256), or None without flash-attn."""
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return None
    import torch

    block = 256
    nb = -(-ctx_len // block)
    kc = torch.randn(b * nb, block, hkv, d, dtype=q.dtype, device=ctx.device)
    vc = torch.randn_like(kc)
    table = torch.randperm(b * nb, device=ctx.device, dtype=torch.int32).view(b, nb)
    lens = torch.full((b,), ctx_len, dtype=torch.int32, device=ctx.device)
    q4 = q.view(b, 1, q.shape[1], d)  # [B, 1, H, D]
    return lambda: flash_attn_with_kvcache(q4, kc, vc, cache_seqlens=lens, block_table=table)


def bench_cuda_decode(ctx: Any) -> None:
    if ctx.dry or _STATUS["cuda"] != "built":
        return
    import torch
    from gpu_check import paged_case

    from fastinfer.ops import cuda_backend, torch_backend, triton_backend

    h, hkv, d = 32, 8, 128
    for b, ctx_len in DECODE_CASES:
        q, kc, vc, meta = paged_case(ctx, [1] * b, [ctx_len] * b, h, hkv, d, 16, torch.bfloat16, poison=False)
        t_cuda = ctx.time_ms(lambda: cuda_backend.paged_attention(q, kc, vc, meta, d ** -0.5))  # noqa: B023
        t_tri = ctx.time_ms(lambda: triton_backend.paged_attention(q, kc, vc, meta, d ** -0.5))  # noqa: B023
        t_torch = (ctx.time_ms(lambda: torch_backend.paged_attention(q, kc, vc, meta, d ** -0.5), reps=5)  # noqa: B023
                   if b * ctx_len <= 65536 else float("nan"))
        fa = _flash_attn_decode(ctx, q, b, ctx_len, hkv, d)
        t_fa = ctx.time_ms(fa) if fa is not None else float("nan")
        gb_s = 2 * b * ctx_len * hkv * d * kc.element_size() / t_cuda / 1e6
        ctx.emit({"case": f"cuda decode B={b} ctx={ctx_len}", "cuda_ms": t_cuda, "triton_ms": t_tri,
                  "torch_ms": t_torch, "flash_attn_ms": t_fa, "kv_gb_s": gb_s, "frac_of_copy": gb_s / ctx.copy_gb_s,
                  "target": ">=0.85", "meets": gb_s / ctx.copy_gb_s >= 0.85})


def bench_cuda_gemv(ctx: Any) -> None:
    if ctx.dry or _STATUS["cuda"] != "built":
        return
    import torch
    import torch.nn.functional as F
    from gpu_check_quant import _nbytes, _weight

    from fastinfer.ops import cuda_backend, triton_backend
    from fastinfer.quantization import dequantize

    for n, k in GEMV_SHAPES:
        x = torch.randn(1, k, device=ctx.device, dtype=torch.bfloat16)  # [1, K]
        for s, (name, bits, group) in enumerate([("int4-g128", 4, 128), ("int8-perchannel", 8, None)]):
            qweight, scales, mins, g = _weight(ctx, n, k, bits, group, seed=s)
            w = dequantize(qweight, scales, mins, bits, g).to(torch.bfloat16)  # [N, K]
            t_cuda = ctx.time_ms(lambda: cuda_backend.quant_linear(x, qweight, scales, mins, bits, g))  # noqa: B023
            t_tri = ctx.time_ms(lambda: triton_backend.quant_linear(x, qweight, scales, mins, bits, g))  # noqa: B023
            t_bf16 = ctx.time_ms(lambda: F.linear(x, w))  # noqa: B023
            gb_s = _nbytes(qweight, scales, mins) / t_cuda / 1e6
            ctx.emit({"case": f"cuda quant_gemv {name} M=1 {n}x{k}", "cuda_ms": t_cuda, "triton_ms": t_tri,
                      "bf16_ms": t_bf16, "vs_bf16": t_bf16 / t_cuda, "target": f">={GEMV_TARGETS[bits]}x",
                      "meets": t_bf16 / t_cuda >= GEMV_TARGETS[bits], "gb_s": gb_s,
                      "frac_of_copy": gb_s / ctx.copy_gb_s})


def register(check, bench) -> None:
    """Called by gpu_check.py before any check runs: build the CUDA tier if needed, then one check, two benches."""
    import torch

    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():  # --dry
        _STATUS["cuda"] = "dry run"
    else:
        _STATUS["cuda"] = ensure_cuda_tier()
        print(f"# gpu_check_cuda: CUDA kernels {_STATUS['cuda']}", flush=True)
    check("cuda_kernels")(check_cuda_kernels)
    bench("cuda_decode")(bench_cuda_decode)
    bench("cuda_gemv")(bench_cuda_gemv)
