"""quant_linear's Triton kernels (kernels/quant.py) against fastinfer.ops.reference.quant_linear. On CPU they run
under TRITON_INTERPRET=1 (set by tests/conftest.py) with fp32 and fp16 activations (the interpreter's bf16 dot is
wrong); bf16 runs in the gpu-marked test. Small shapes: every path (GEMV, split-K, GEMM, fallback) in seconds."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

from fastinfer.kernels import quant as Q  # noqa: E402

from fastinfer.ops import OpSet, reference  # noqa: E402
from fastinfer.ops import triton_backend as tb  # noqa: E402
from fastinfer.quantization import dequantize, pack_int4, quantize  # noqa: E402
from tests.ops.test_triton_kernels import _COMPILE_SCRIPT  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}

# name -> (bits, group_size (None: per output channel), K): K an odd multiple of the group
FORMATS = {
    "int8-perchannel": (8, None, 200),
    "int8-g32": (8, 32, 96),
    "int4-g32": (4, 32, 160),
    "int4-g64": (4, 64, 192),
    "int4-g128": (4, 128, 384),
}
M_VALUES = (1, 3, 16, 33, 64)  # 1: GEMV kernel; 3, 16: dot kernel with split-K; 33, 64: GEMM
N_VALUES = (1, 17, 101)


def _weight(n: int, k: int, bits: int, group: int | None, scale_dtype: torch.dtype, seed: int = 0):
    """(qweight, scales, mins) of an RTN-quantized random [N, K] weight, scales/mins in ``scale_dtype``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05  # [N, K]
    qw = quantize(w, "int8" if bits == 8 else "int4", group)
    mins = None if qw.mins is None else qw.mins.to(scale_dtype).to(DEVICE)
    return qw.qweight.to(DEVICE), qw.scales.to(scale_dtype).to(DEVICE), mins, qw.group_size


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """Within the dtype's tolerance, relative to the output's scale (K-long sums)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    assert torch.isfinite(out).all(), "non-finite output"
    scale = 1.0 + ref.float().abs().max().item() if ref.numel() else 1.0
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype] * scale, rtol=TOL[dtype])


def _cases() -> list:
    """Each format at each M; N, x dtype, scale dtype, bias and a 3-D x rotate so every value meets every format."""
    cases = []
    for f, name in enumerate(FORMATS):
        for i, m in enumerate(M_VALUES):
            n = N_VALUES[(f + i) % 3]
            x_dtype = (torch.float32, torch.float16)[(f + i) % 2]
            s_dtype = (torch.float32, torch.float16)[(f + i // 2) % 2]
            bias = (f + i) % 3 != 1
            three_d = i % 2 == 1
            cid = f"{name}-M{m}-N{n}-x{str(x_dtype)[-2:]}-s{str(s_dtype)[-2:]}{'-bias' if bias else ''}" \
                  f"{'-3d' if three_d else ''}"
            cases.append(pytest.param(name, m, n, x_dtype, s_dtype, bias, three_d, id=cid))
    return cases


@pytest.mark.parametrize("fmt,m,n,x_dtype,s_dtype,use_bias,three_d", _cases())
def test_quant_linear_matches_reference(fmt, m, n, x_dtype, s_dtype, use_bias, three_d):
    bits, group, k = FORMATS[fmt]
    qweight, scales, mins, g = _weight(n, k, bits, group, s_dtype, seed=m * 100 + n)
    torch.manual_seed(m)
    shape = (m // 3, 3, k) if three_d and m % 3 == 0 else (1, m, k) if three_d else (m, k)
    x = torch.randn(shape).to(DEVICE, x_dtype)  # [..., K]
    bias = torch.randn(n, device=DEVICE) if use_bias else None
    out = tb.quant_linear(x, qweight, scales, mins, bits, g, bias)
    _close(out, reference.quant_linear(x, qweight, scales, mins, bits, g, bias), x_dtype)


@pytest.mark.parametrize("fmt", ["int8-perchannel", "int4-g32", "int4-g128"])
@pytest.mark.parametrize("m,gemv_max_m", [(1, 1), (3, 4), (5, 1)])  # GEMV, GEMV over 3 rows, dot kernel
def test_split_k_is_exact_and_deterministic(fmt, m, gemv_max_m):
    """Split-K on and off (also splits that cover no K at all); the fixed-order reduction gives the same bits on
    every run."""
    bits, group, k = FORMATS[fmt]
    qweight, scales, mins, g = _weight(37, k, bits, group, torch.float16, seed=7)
    x = torch.randn(m, k).to(DEVICE, torch.float16)  # [M, K]
    bias = torch.randn(37, device=DEVICE, dtype=torch.float16)
    ref = reference.quant_linear(x, qweight, scales, mins, bits, g, bias)
    for split_k in (1, 2, 3, 16):
        out = Q.quant_linear(x, qweight, scales, mins, bits, g, bias, gemv_max_m=gemv_max_m, split_k=split_k)
        _close(out, ref, torch.float16)
        again = Q.quant_linear(x, qweight, scales, mins, bits, g, bias, gemv_max_m=gemv_max_m, split_k=split_k)
        assert torch.equal(out, again), f"split_k={split_k} is not deterministic"


def test_forced_configs_cover_subtiles():
    """Forced launch configs: several groups per GEMV step (3-D tiles), a GEMM step of four unrolled group pieces,
    a per-channel K that is not a multiple of BLOCK_K."""
    qweight, scales, mins, g = _weight(40, 256, 4, 32, torch.float32, seed=3)
    x1 = torch.randn(1, 256).to(DEVICE, torch.float32)
    cfg = Q.QuantConfig(1, 16, 128, 32, split_k=2, k_split=128, num_warps=4, num_stages=1)  # 4 groups per step
    _close(Q.quant_linear(x1, qweight, scales, mins, 4, g, config=cfg),
           reference.quant_linear(x1, qweight, scales, mins, 4, g), torch.float32)
    x9 = torch.randn(9, 256).to(DEVICE, torch.float16)
    cfg = Q.QuantConfig(16, 16, 128, 32, split_k=1, k_split=256, num_warps=4, num_stages=1)
    _close(Q.quant_linear(x9, qweight, scales, mins, 4, g, config=cfg),
           reference.quant_linear(x9, qweight, scales, mins, 4, g), torch.float16)
    qweight, scales, mins, g = _weight(20, 200, 8, None, torch.float32, seed=4)
    x9 = torch.randn(9, 200).to(DEVICE, torch.float16)
    cfg = Q.QuantConfig(16, 32, 128, 128, split_k=2, k_split=128, num_warps=4, num_stages=1)
    _close(Q.quant_linear(x9, qweight, scales, mins, 8, g, config=cfg),
           reference.quant_linear(x9, qweight, scales, mins, 8, g), torch.float16)
    x192 = torch.randn(9, 192).to(DEVICE, torch.float16)
    with pytest.raises(AssertionError, match="crosses groups"):
        Q.quant_linear(x192, *_weight(20, 192, 4, 64, torch.float32)[:3], 4, 64,
                       config=Q.QuantConfig(16, 32, 128, 128, 2, 128, 4, 1))


def test_gguf_blocks_full_value_range():
    """GGUF-shaped weights with every code: Q8_0 (int8 incl. -128, fp16 d), Q4_0 (mins = -8 d) and Q4_1 (fp16 d, m),
    through the GEMV, split-K and GEMM paths."""
    n, k = 19, 160
    g = torch.Generator().manual_seed(5)
    d = (torch.rand(n, k // 32, generator=g) * 0.02 + 1e-3).half().to(DEVICE)  # [N, K/32]
    q8 = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g).to(DEVICE)
    q4 = pack_int4(torch.randint(0, 16, (n, k), generator=g)).to(DEVICE)  # [N, K/2]
    m1 = (torch.randn(n, k // 32, generator=g) * 0.01).half().to(DEVICE)
    formats = [(q8, d, None, 8), (q4, d, (-8 * d.float()).half(), 4), (q4, d, m1, 4)]
    for m in (1, 4, 20):
        x = torch.randn(m, k).to(DEVICE, torch.float16)
        for qweight, scales, mins, bits in formats:
            _close(tb.quant_linear(x, qweight, scales, mins, bits, 32),
                   reference.quant_linear(x, qweight, scales, mins, bits, 32), torch.float16)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_dequantize_kernel_and_fallback_path(fmt):
    """The one-pass dequantization equals the format's fp32 dequantization (bit for bit under the interpreter; a
    GPU may fuse ``q * s + m`` into one FMA), and the large-M path (forced here with fallback_min_m=1) matches."""
    bits, group, k = FORMATS[fmt]
    qweight, scales, mins, g = _weight(17, k, bits, group, torch.float16, seed=11)
    w = Q.dequantize(qweight, scales, mins, bits, g)  # [N, K] fp32
    want = dequantize(qweight, scales, mins, bits, g)
    w16 = Q.dequantize(qweight, scales, mins, bits, g, torch.float16)
    if DEVICE == "cpu":
        assert torch.equal(w, want) and torch.equal(w16, want.half())
    else:
        torch.testing.assert_close(w, want, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(w16, want.half(), rtol=1e-3, atol=1e-6)
    x = torch.randn(2, 3, k).to(DEVICE, torch.float16)  # [2, 3, K]
    bias = torch.randn(17, device=DEVICE)
    out = Q.quant_linear(x, qweight, scales, mins, bits, g, bias, fallback_min_m=1)
    _close(out, reference.quant_linear(x, qweight, scales, mins, bits, g, bias), torch.float16)


@pytest.mark.parametrize("bits,group,k", [(8, 48, 96), (4, 16, 64), (8, 8, 64)])
def test_unsupported_group_sizes_take_the_torch_path(bits, group, k):
    """Group sizes no kernel tile fits (not a power of two >= 16 / 32, not the whole row) still compute right."""
    assert Q.sub_tile(bits, group, k, 64) is None
    qweight, scales, mins, g = _weight(9, k, bits, group, torch.float32)
    x = torch.randn(3, k).to(DEVICE, torch.float32)
    _close(Q.quant_linear(x, qweight, scales, mins, bits, g), reference.quant_linear(x, qweight, scales, mins, bits, g),
           torch.float32)


def test_path_selection_and_thresholds():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert [Q.select_path(m, cpu) for m in (1, 2, 16, 17, 4096)] == ["gemv", "splitk", "splitk", "gemm", "gemm"]
    assert Q.select_path(Q.FALLBACK_MIN_M, gpu) == "fallback"
    assert Q.select_path(Q.FALLBACK_MIN_M - 1, gpu) == "gemm"
    assert Q.select_path(8, cpu, gemv_max_m=8) == "gemv"
    assert Q.select_path(20, cpu, splitk_max_m=32) == "splitk"
    assert Q.select_path(20, cpu, fallback_min_m=20) == "fallback"
    assert Q.select_path(20, gpu, fallback_min_m=0) == "gemm"  # 0 turns the fallback off


def test_strided_and_empty_inputs():
    qweight, scales, mins, g = _weight(21, 96, 4, 32, torch.float32)
    wide = torch.randn(5, 2 * 96).to(DEVICE, torch.float16)
    x = wide[:, :96]  # non-contiguous rows
    _close(tb.quant_linear(x, qweight, scales, mins, 4, g), reference.quant_linear(x, qweight, scales, mins, 4, g),
           torch.float16)
    empty = torch.empty(0, 96, device=DEVICE, dtype=torch.float16)
    out = tb.quant_linear(empty, qweight, scales, mins, 4, g)
    assert out.shape == (0, 21) and out.dtype == torch.float16


def test_bad_inputs_raise():
    qweight, scales, mins, g = _weight(8, 64, 4, 32, torch.float32)
    x = torch.randn(2, 64, device=DEVICE)
    with pytest.raises(AssertionError, match="qweight must be 2-D"):
        tb.quant_linear(x, qweight.view(torch.int8), scales, mins, 4, g)
    with pytest.raises(AssertionError, match="x \\[..., 64\\]"):
        tb.quant_linear(x[:, :32], qweight, scales, mins, 4, g)
    with pytest.raises(AssertionError, match="scales must be"):
        tb.quant_linear(x, qweight, scales[:, :1], mins, 4, g)
    with pytest.raises(AssertionError, match="contiguous"):
        tb.quant_linear(x, qweight.t().contiguous().t(), scales, mins, 4, g)
    with pytest.raises(AssertionError, match="bias"):
        tb.quant_linear(x, qweight, scales, mins, 4, g, torch.zeros(7, device=DEVICE))
    with pytest.raises(AssertionError, match="x dtype"):
        tb.quant_linear(x.double(), qweight, scales, mins, 4, g)


def test_registry_runs_the_triton_kernel():
    ops = OpSet(DEVICE, prefer="triton")
    assert ops.chosen["quant_linear"] == "triton" and ops.quant_linear is tb.quant_linear


# The sm_90 compile check of tests/ops/test_triton_kernels.py (its ``build`` helper), on the quant kernels with the
# configs the launcher picks on an H200 (132 SMs) for Llama-3-8B-shaped weights.
_QUANT_COMPILE = r"""
import torch
from fastinfer.kernels import quant as Q
Q._num_sms = lambda index: 132
gpu = torch.device("cuda", 0)
def ptrs(bits, sdt):
    qw = "*i8" if bits == 8 else "*u8"
    return {"qw_ptr": qw, "s_ptr": sdt, "mn_ptr": sdt, "bias_ptr": "*bf16", "ws_ptr": "*fp32"}
weights = [(4, 128, 4096, 14336, "*fp16"), (4, 32, 14336, 4096, "*fp32"), (8, 4096, 4096, 4096, "*fp32")]
for bits, g, n, k, sdt in weights:
    c = Q.gemv_config(n, k, bits, g, gpu)
    build(Q._gemv_kernel, "*bf16", dict(BITS=bits, BLOCK_N=c.block_n, BLOCK_K=c.block_k, SUB_K=c.sub_k,
          HAS_MINS=bits == 4, HAS_BIAS=False, SPLIT=c.split_k > 1, EVEN_K=True), ptrs(bits, sdt),
          warps=c.num_warps, stages=c.num_stages)
    for m, dt, tdt in [(16, "*bf16", torch.bfloat16), (64, "*fp16", torch.float16), (256, "*bf16", torch.bfloat16)]:
        c = Q.gemm_config(m, n, k, bits, g, tdt, gpu, m <= 16)
        build(Q._gemm_kernel, dt, dict(BITS=bits, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
              SUB_K=c.sub_k, GROUP_M=8, HAS_MINS=bits == 4, HAS_BIAS=True, SPLIT=c.split_k > 1, EVEN_K=True,
              DOT_PRECISION="tf32"), ptrs(bits, sdt), warps=c.num_warps, stages=c.num_stages)
c = Q.gemm_config(32, 4096, 4096, 8, 4096, torch.float32, gpu, False)
build(Q._gemm_kernel, "*fp32", dict(BITS=8, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, SUB_K=c.sub_k,
      GROUP_M=8, HAS_MINS=False, HAS_BIAS=False, SPLIT=False, EVEN_K=False, DOT_PRECISION="ieee"),
      ptrs(8, "*fp32"), warps=c.num_warps, stages=c.num_stages)
build(Q._dequant_kernel, "*bf16", dict(BITS=4, BLOCK_N=32, BLOCK_K=128, HAS_MINS=True), ptrs(4, "*fp16"))
build(Q._dequant_kernel, "*fp16", dict(BITS=8, BLOCK_N=32, BLOCK_K=128, HAS_MINS=False), ptrs(8, "*fp32"))
build(Q._splitk_reduce_kernel, "*bf16", dict(BLOCK=1024, HAS_BIAS=True), {"ws_ptr": "*fp32"})
print("ALL COMPILED")
"""


@pytest.mark.skipif(sys.platform != "linux", reason="the triton wheel ships ptxas for linux")
def test_quant_kernels_compile_for_hopper():
    marker = "\nidx = "  # the shared script's setup and ``build`` end where its attention cases begin
    assert marker in _COMPILE_SCRIPT, "tests/ops/test_triton_kernels.py changed its compile script's layout"
    script = _COMPILE_SCRIPT.split(marker)[0] + _QUANT_COMPILE
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script, str(root)], capture_output=True, text=True, env=env,
                          timeout=300)
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0 and "ALL COMPILED" in proc.stdout, (proc.stdout + proc.stderr)[-4000:]


# ------------------------------------------------------------------------------------- GPU-only (bf16)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8-perchannel", "int8-g32", "int4-g128", "int4-g32"])
@pytest.mark.parametrize("m", [1, 5, 16, 64, 256])
def test_quant_linear_bf16(fmt, m):
    """bf16 on CUDA at a model-like width, every path incl. the large-M fallback (M=256)."""
    bits, group, _ = FORMATS[fmt]
    k = 4096 if group is None else 32 * group  # [N, K] = [1000, 1024..4096]
    qweight, scales, mins, g = _weight(1000, k, bits, group, torch.float16, seed=m)
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    bias = torch.randn(1000, device=DEVICE, dtype=torch.bfloat16)
    _close(tb.quant_linear(x, qweight, scales, mins, bits, g, bias),
           reference.quant_linear(x, qweight, scales, mins, bits, g, bias), torch.bfloat16)
