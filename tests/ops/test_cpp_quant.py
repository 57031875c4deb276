"""The compiled quant_linear kernel (fastinfer._C via fastinfer.ops.cpp_backend) against fastinfer.ops.reference.

Every instruction-set variant the CPU supports runs every case; row counts cover the in-register kernel
(few rows) and the dequantize + GEMM path (many rows), odd N and K an odd multiple of the group."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("fastinfer._C", reason="compiled extension not built (pip install -e . --no-build-isolation)")

from fastinfer.ops import cpp_backend as cpp  # noqa: E402
from fastinfer.ops import reference, torch_backend  # noqa: E402
from fastinfer.ops.registry import OpSet  # noqa: E402
from fastinfer.quantization import QuantizedWeight, dequantize, pack_int4, quantize_int4, quantize_int8  # noqa: E402

ROWS = (1, 3, 7, 16, 33, 64)  # M: decode sizes through the GEMM path
XDTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Output error allowed, as a fraction of the output's largest magnitude: fp32 must match the fp32 reference
# to accumulation-order noise; bf16/fp16 to about one rounding of the output (or of the weight in the GEMM
# path, which dequantizes to x's dtype).
TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def make_weight(bits: int, group: int | None, n: int, k: int, scale_dtype: torch.dtype, seed: int = 0,
                mins: bool = False) -> QuantizedWeight:
    """RTN-quantized random [n, k] weight; scales (and mins) in ``scale_dtype``. ``mins`` adds mins to int8."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05  # [N, K]
    qw = quantize_int8(w, group) if bits == 8 else quantize_int4(w, group or 128)
    m = qw.mins
    if mins and m is None:
        m = torch.randn(qw.scales.shape, generator=gen) * 0.01  # [N, G]
    return QuantizedWeight(bits, qw.group_size, qw.qweight, qw.scales.to(scale_dtype),
                           None if m is None else m.to(scale_dtype))


def check(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Kernel vs the reference computed in fp32 from the same inputs (x's precision kept)."""
    args = (qw.qweight, qw.scales, qw.mins, qw.bits, qw.group_size, bias)
    out = cpp.quant_linear(x, *args)
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], qw.shape[0])
    ref = reference.quant_linear(x.float(), *args)  # [..., N] fp32
    scale = max(ref.abs().max().item(), 1e-6)
    tol = TOL[x.dtype]
    torch.testing.assert_close(out.float(), ref, atol=tol * scale, rtol=tol)
    return out


# (bits, group_size or None = per channel, K, N): K an odd multiple of the group, odd N.
CASES = [
    (8, None, 200, 17),
    (8, None, 2049, 17),  # long odd rows: the bf16 kernel's masked tail
    (8, None, 64, 1),
    (8, 32, 224, 101),
    (4, 32, 160, 101),
    (4, 64, 192, 17),
    (4, 128, 384, 1),
]


def _case_id(c) -> str:
    bits, group, k, n = c
    return f"int{bits}-g{group or 'K'}-K{k}-N{n}"


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16], ids=["s32", "s16"])
@pytest.mark.parametrize("xdtype", list(XDTYPES.values()), ids=list(XDTYPES))
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference(isa, case, xdtype, scale_dtype, bias):
    bits, group, k, n = case
    qw = make_weight(bits, group, n, k, scale_dtype)
    gen = torch.Generator().manual_seed(1)
    b = torch.randn(n, generator=gen) if bias else None  # [N]
    for m in ROWS:
        check(torch.randn(m, k, generator=gen).to(xdtype), qw, b)  # [M, K]


@pytest.mark.parametrize("bits,group", [(8, None), (8, 32), (4, 32), (4, 128)], ids=["i8c", "i8g32", "i4g32", "i4g128"])
def test_bf16_within_one_rounding(isa, bits, group):
    """Few rows (the in-register kernels): bf16 outputs are the fp32 reference rounded once, give or take one
    bf16 step (fp32 summation order decides ties; outputs near zero get fp32 noise of the output scale)."""
    k = 2048
    qw = make_weight(bits, group, 64, k, torch.float16, seed=13)
    gen = torch.Generator().manual_seed(14)
    for m in (1, 2, 4):
        x = (torch.randn(m, k, generator=gen) + 0.3).bfloat16()  # [M, K], nonzero mean
        out = cpp.quant_linear(x, qw.qweight, qw.scales, qw.mins, bits, qw.group_size).float()
        ref = reference.quant_linear(x.float(), qw.qweight, qw.scales, qw.mins, bits, qw.group_size)
        step = 2.0 ** (torch.floor(torch.log2(ref.abs().clamp_min(1e-30))) - 7)  # bf16 spacing at |ref|
        assert ((out - ref).abs() <= step + 1e-5 * ref.abs().max()).all()


@pytest.mark.parametrize("bits,group", [(8, None), (8, 32), (4, 32), (4, 64)], ids=["i8c", "i8g32", "i4g32", "i4g64"])
@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_many_rows_match_torch_backend_bitwise(isa, bits, group, xdtype):
    """Many rows dequantize chunks of W to x's dtype (bf16: one rounding of the exact fp32 weight q * s + m,
    fp32 scales included) and run the same GEMM as the torch backend, across chunk boundaries (N over one
    chunk). bf16 outputs are identical. fp32 GEMMs of a 512-row chunk and of the whole N may sum in another
    order (seen with oneDNN on AMX machines), so fp32 is bitwise equal to the torch GEMM run chunk by chunk on
    the exactly dequantized weight, and within fp32 rounding of the unchunked one."""
    qw = make_weight(bits, group, 1100, 2048, torch.float32, seed=15)
    gen = torch.Generator().manual_seed(16)
    x = torch.randn(40, 2048, generator=gen).to(xdtype)  # [M, K]
    args = (qw.qweight, qw.scales, qw.mins, bits, qw.group_size)
    out, ref = cpp.quant_linear(x, *args), torch_backend.quant_linear(x, *args)
    if xdtype == torch.bfloat16:
        assert torch.equal(out, ref)
        return
    w = dequantize(*args).to(xdtype)  # [N, K], exact
    rows = (4 << 20) // (2048 * 4)  # the kernel's chunk: 4 MiB of fp32 weight rows
    chunked = torch.cat([torch.mm(x, w[i:i + rows].t()) for i in range(0, w.shape[0], rows)], dim=1)
    assert torch.equal(out, chunked)
    assert (out - ref).abs().max() <= 1e-6 * ref.abs().max()


@pytest.mark.parametrize("k", [200, 2049])
@pytest.mark.parametrize("xdtype", list(XDTYPES.values()), ids=list(XDTYPES))
def test_int8_per_channel_with_mins(isa, xdtype, k):
    qw = make_weight(8, None, 33, k, torch.float32, seed=2, mins=True)
    gen = torch.Generator().manual_seed(3)
    for m in ROWS:
        check((torch.randn(m, k, generator=gen) + 0.5).to(xdtype), qw)  # [M, K], nonzero mean


def test_gguf_blocks_exact(isa):
    """Q4_0 (mins = -8 d), Q4_1 and Q8_0 (incl. -128) with fp16 d/m: the weight is exact in fp32, so fp32 x
    matches the reference to accumulation order."""
    gen = torch.Generator().manual_seed(4)
    n, k = 45, 32 * 9
    d = (torch.rand(n, k // 32, generator=gen) * 0.02 + 1e-3).half()  # [N, G]
    q4 = pack_int4(torch.randint(0, 16, (n, k), generator=gen))  # [N, K // 2]
    q8 = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)  # [N, K]
    m41 = (torch.randn(n, k // 32, generator=gen) * 0.05).half()  # [N, G]
    for qw in (QuantizedWeight(4, 32, q4, d, (-8 * d.float()).half()), QuantizedWeight(4, 32, q4, d, m41),
               QuantizedWeight(8, 32, q8, d, None)):
        for m in ROWS:
            check(torch.randn(m, k, generator=gen), qw)
            check(torch.randn(m, k, generator=gen).bfloat16(), qw)


@pytest.mark.parametrize("bits,group", [(8, None), (8, 32), (4, 32), (4, 128)], ids=["i8c", "i8g32", "i4g32", "i4g128"])
def test_threads_and_larger_layers(threads, bits, group):
    """Enough work to split the output rows across threads (and N not a multiple of the row tile)."""
    qw = make_weight(bits, group, 1003, 512, torch.float16, seed=5)
    gen = torch.Generator().manual_seed(6)
    b = torch.randn(1003, generator=gen)
    for m in (1, 2, 5, 9, 40):
        for dt in (torch.float32, torch.bfloat16):
            check(torch.randn(m, 512, generator=gen).to(dt), qw, b)


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32)], ids=["i8c", "i4g32"])
def test_strided_and_3d_x(bits, group):
    qw = make_weight(bits, group, 40, 256, torch.float16, seed=7)
    gen = torch.Generator().manual_seed(8)
    for m in (1, 5, 24):
        wide = torch.randn(m, 3 * 256, generator=gen).bfloat16()  # [M, 3K]
        check(wide[:, 256:512], qw)  # row stride 3K: used in place
        check(wide[:, ::3], qw)  # column stride 3: copied
        check(torch.randn(2, m, 256, generator=gen), qw)  # [B, M, K]
    out = check(torch.randn(2, 3, 4, 256, generator=gen).bfloat16(), qw)
    assert out.shape == (2, 3, 4, 40)
    assert cpp.quant_linear(torch.randn(0, 256), qw.qweight, qw.scales, qw.mins, bits, qw.group_size).shape == (0, 40)


def test_mixed_scale_and_min_dtypes():
    qw = make_weight(4, 32, 17, 64, torch.float32, seed=9)
    check(torch.randn(3, 64), QuantizedWeight(4, 32, qw.qweight, qw.scales.half(), qw.mins))


def test_unsupported_group_falls_back_to_torch(caplog):
    qw = make_weight(4, 16, 9, 64, torch.float32, seed=10)  # int4 group 16: not a kernel case
    with caplog.at_level("WARNING", logger="fastinfer.ops"):
        check(torch.randn(2, 64), qw)
    assert "group_size 16" in caplog.text


def test_bad_arguments_raise():
    qw = make_weight(4, 32, 9, 64, torch.float32, seed=11)
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="qweight"):
        torch.ops.fastinfer.quant_linear(x, qw.qweight.to(torch.int8), qw.scales, qw.mins, 4, 32, None)
    with pytest.raises(RuntimeError, match="mins"):
        torch.ops.fastinfer.quant_linear(x, qw.qweight, qw.scales, None, 4, 32, None)
    with pytest.raises(RuntimeError, match="scales"):
        torch.ops.fastinfer.quant_linear(x, qw.qweight, qw.scales[:, :1], qw.mins, 4, 32, None)


def test_fake_kernel_traces():
    from torch._subclasses.fake_tensor import FakeTensorMode

    qw = make_weight(4, 32, 9, 64, torch.float32, seed=12)
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = torch.ops.fastinfer.quant_linear(torch.empty(5, 64), qw.qweight, qw.scales, qw.mins, 4, 32, None)
        assert out.shape == (5, 9)


def test_registry_picks_cpp_on_cpu(monkeypatch):
    monkeypatch.delenv("FASTINFER_BACKEND", raising=False)
    assert OpSet("cpu").chosen["quant_linear"] == "cpp"
