"""W4A8 / W8A8 ``quant_linear_a8`` (int4 or int8 weights x int8 activations per block of 32, integer dots) on every
instruction-set variant against ``ops.reference.quant_linear_a8`` (float64 over the same integer dots): odd N,
block counts that leave the AVX-512 pair loop a tail, groups 32 / 64 / 128, fp32 / fp16 scales (GGUF keeps f16),
with and without bias, x in fp32 / bf16 / fp16, 1 to 33 rows, 2 threads; a row's output is bit-identical whatever
the batch; the torch backend; the activation rounding itself; errors, fallback, fake mode."""
from __future__ import annotations

import pytest
import torch

from fastinfer.ops import reference, torch_backend
from fastinfer.quantization.format import QuantizedWeight
from fastinfer.quantization.rtn import quantize_int4, quantize_int8

pytest.importorskip("fastinfer._C", reason="compiled extension not built (pip install -e . --no-build-isolation)")
from fastinfer.ops import cpp_backend as cpp  # noqa: E402

TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 1.6e-2), torch.float16: (3e-3, 3e-3)}


def case(m: int, n: int, k: int, group: int, dtype=torch.float32, f16_scales: bool = False, bias: bool = False,
         seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    qw = quantize_int4(torch.randn(n, k, generator=gen) * 0.05, group, search=False)
    scales, mins = (qw.scales.half(), qw.mins.half()) if f16_scales else (qw.scales, qw.mins)
    x = (torch.randn(m, k, generator=gen) * 2).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    return x, qw.qweight, scales, mins, group, b


SHAPES = [(1, 37, 96, 32), (5, 64, 256, 64), (9, 130, 384, 128), (3, 8, 32, 32), (33, 17, 160, 32), (2, 11, 608, 32)]


@pytest.mark.usefixtures("isa")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("f16,bias", [(False, False), (True, True)], ids=["f32scales", "f16scales+bias"])
@pytest.mark.parametrize("m,n,k,group", SHAPES)
def test_matches_reference_and_rows_do_not_depend_on_the_batch(m, n, k, group, f16, bias, dtype, caplog):
    args = case(m, n, k, group, dtype, f16, bias, seed=m + n + k)
    with caplog.at_level("WARNING", logger="fastinfer.ops"):
        out = cpp.quant_linear_a8(*args)
    assert "torch backend" not in caplog.text  # the kernel ran
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, reference.quant_linear_a8(*args), atol=atol, rtol=rtol)
    x = args[0]
    single = torch.cat([cpp.quant_linear_a8(x[i:i + 1], *args[1:]) for i in range(m)])
    assert torch.equal(single, out)


def int8_case(m: int, n: int, k: int, group: int | None, mins: bool, seed: int = 0):
    """int8 weights per channel (group None) or in groups (32: Q8_0, 16: Q6_K), optionally asymmetric (Q5_1-like
    mins), with some codes at -128 (GGUF Q8_0 may hold it)."""
    gen = torch.Generator().manual_seed(seed)
    qw = quantize_int8(torch.randn(n, k, generator=gen) * 0.05, group)
    q = qw.qweight.clone()
    q.view(-1)[:: 7] = -128
    m_t = (torch.randn(qw.scales.shape, generator=gen) * 0.01) if mins else None
    qw = QuantizedWeight(8, qw.group_size, q, qw.scales, m_t)
    x = (torch.randn(m, k, generator=gen) * 2).float()
    return x, qw.qweight, qw.scales, qw.mins, qw.group_size, None


INT8_CASES = [(1, 37, 96, None, False), (5, 64, 256, 32, False), (9, 17, 160, 16, True), (3, 20, 256, 64, True),
              (2, 9, 96, 32, True), (4, 130, 160, None, True)]


@pytest.mark.usefixtures("isa")
@pytest.mark.parametrize("m,n,k,group,mins", INT8_CASES,
                         ids=[f"{m}x{n}x{k}-g{g or 'K'}{'-mins' if mn else ''}" for m, n, k, g, mn in INT8_CASES])
def test_int8_weights(m, n, k, group, mins):
    args = int8_case(m, n, k, group, mins, seed=m + n)
    out = cpp.quant_linear_a8(*args)
    torch.testing.assert_close(out, reference.quant_linear_a8(*args), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(torch_backend.quant_linear_a8(*args), reference.quant_linear_a8(*args),
                               atol=2e-5, rtol=2e-5)
    single = torch.cat([cpp.quant_linear_a8(args[0][i:i + 1], *args[1:]) for i in range(m)])
    assert torch.equal(single, out)
    exact = reference.quant_linear(args[0], args[1], args[2], args[3], 8, args[4])
    assert 0 < ((out - exact).abs().max() / exact.abs().max()) < 0.03


@pytest.mark.usefixtures("isa")
@pytest.mark.parametrize("threads", [2], indirect=True, ids=["2threads"])
def test_threads_split_output_rows(threads):
    args = case(3, 1030, 1024, 128, seed=7)
    torch.testing.assert_close(cpp.quant_linear_a8(*args), reference.quant_linear_a8(*args), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("m,n,k,group", SHAPES)
def test_torch_backend_matches_reference(m, n, k, group):
    args = case(m, n, k, group, bias=True, seed=m)
    torch.testing.assert_close(torch_backend.quant_linear_a8(*args), reference.quant_linear_a8(*args),
                               atol=2e-5, rtol=2e-5)


def test_activation_rounding_and_that_it_is_an_approximation():
    x = torch.tensor([[0.0] * 32 + [1.0, -2.0, 0.5, 127.0] + [0.0] * 28])
    xq, d = reference.quantize_activations(x)
    assert d.tolist() == [[0.0, 1.0]] and xq[0, 0].abs().sum() == 0
    assert xq[0, 1, :4].tolist() == [1.0, -2.0, 0.0, 127.0]  # 0.5 rounds half to even
    args = case(4, 64, 256, 32, seed=3)
    exact = reference.quant_linear(args[0], args[1], args[2], args[3], 4, 32)
    a8 = reference.quant_linear_a8(*args)
    err = (a8 - exact).abs().max() / exact.abs().max()
    assert 0 < err < 0.03, err  # differs from the fp32 kernel by the activation rounding only


def test_errors_fallback_and_fake_mode(caplog):
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, q, s, mn, g, _ = case(2, 16, 64, 32)
    with pytest.raises(ValueError, match="does not divide"):
        torch.ops.fastinfer.quant_linear_a8(x, q, s, mn, 48, None)
    with pytest.raises(ValueError, match=r"uint8 \[N, K / 2\]"):
        torch.ops.fastinfer.quant_linear_a8(x, q.view(torch.int8), s, mn, g, None)
    qw16 = quantize_int4(torch.randn(16, 64) * 0.05, 32, search=False)
    with caplog.at_level("WARNING", logger="fastinfer.ops"):
        out = cpp.quant_linear_a8(x.double(), qw16.qweight, qw16.scales, qw16.mins, 32)
    assert "quant_linear_a8 on cpu torch.float64" in caplog.text
    assert out.dtype == torch.float64
    torch.library.opcheck(torch.ops.fastinfer.quant_linear_a8.default, (x, q, s, mn, g, None))
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (x, q, s, mn)]
        assert cpp.quant_linear_a8(*fake, g).shape == (2, 16)
