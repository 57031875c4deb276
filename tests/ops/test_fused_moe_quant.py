"""``fused_moe`` with int8 / int4 weight-only experts on every backend against the reference, and the reference
against the float op over the dequantized weights (so a wrong dequantization in the spec fails too). Formats: int8
per channel, int8 group 16 (GGUF Q6_K's shape), int8 group 32 with mins (Q5_K's), int4 group 16 / 32 with mins
(Q4_K's); each projection quantized on its own (mixed: int4 gate/up with int8 down, a float w13 with an int8
w2). H = 80 and I = 48 are no multiple of the Triton tiles; odd token counts, 4 to 64 experts, top-k 1 / 2 / 8."""
from __future__ import annotations

import pytest
import torch

from fastinfer.ops import reference, torch_backend
from fastinfer.quantization.format import QuantizedExperts
from fastinfer.quantization.rtn import quantize_int4, quantize_int8
from tests.ops.test_fused_moe import MOE_ISAS, TOL, TRITON_DEVICE, _cpp, forced_isa, needs_triton, threads

__all__ = ["forced_isa", "threads"]  # fixtures used by name below

HIDDEN, INTER = 80, 48
# name -> (bits, group; None: per channel, mins for int8)
FORMATS = {"int8": (8, None, False), "int8-g16": (8, 16, False), "int8-g16-mins": (8, 16, True),
           "int4-g16": (4, 16, True), "int4-g32": (4, 32, True), "int8-g8": (8, 8, False)}
QCASES = [(1, 4, 2), (7, 8, 1), (33, 64, 8), (20, 8, 2)]


def quantize_experts(w: torch.Tensor, fmt: str) -> QuantizedExperts:
    bits, group, mins = FORMATS[fmt]
    parts = []
    for e in range(w.shape[0]):
        qw = quantize_int8(w[e].float(), group) if bits == 8 else quantize_int4(w[e].float(), group)
        if bits == 8 and mins:  # an asymmetric int8 (GGUF Q5_K-like): the codes shifted by a per-group zero point
            n, k = qw.qweight.shape
            zero = torch.randint(-3, 4, (n, k // qw.group_size), generator=torch.Generator().manual_seed(e))
            scales = qw.scales.float()
            qw = type(qw)(8, qw.group_size, (qw.qweight.int() - zero.repeat_interleave(qw.group_size, 1))
                          .clamp(-127, 127).to(torch.int8), scales, zero.float() * scales)
        parts.append(qw)
    return QuantizedExperts.stack(parts)


def qcase(t: int, e: int, k: int, dtype: torch.dtype, fmt13: str | None, fmt2: str | None, seed: int = 0,
          hidden: int = HIDDEN, inter: int = INTER) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """((x, w13, w2, topk_weights, topk_ids), the scale / min kwargs): each projection quantized with its format
    (None: float in x's dtype). Routing skewed to the even experts when k allows (odd experts get no tokens)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, hidden, generator=gen).to(dtype)
    w13 = torch.randn(e, 2 * inter, hidden, generator=gen) / hidden ** 0.5
    w2 = torch.randn(e, hidden, inter, generator=gen) / inter ** 0.5
    scores = torch.randn(t, e, generator=gen)
    if k <= e // 2 and seed % 2:
        scores[:, 1::2] = -1e9
    vals, ids = scores.topk(k, dim=1)
    kw: dict[str, torch.Tensor] = {}
    ws = []
    for name, w, fmt in (("w13", w13, fmt13), ("w2", w2, fmt2)):
        if fmt is None:
            ws.append(w.to(dtype))
            continue
        q = quantize_experts(w, fmt)
        ws.append(q.qweight)
        kw[f"{name}_scales"] = q.scales
        if q.mins is not None:
            kw[f"{name}_mins"] = q.mins
    return (x, ws[0], ws[1], vals.softmax(dim=1), ids), kw


def dequantized(case: tuple[torch.Tensor, ...], kw: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The same case with fp32 float experts: the quantized weights dequantized."""
    x, w13, w2, wts, ids = case
    return (x, reference.expert_weights(w13, kw.get("w13_scales"), kw.get("w13_mins")),
            reference.expert_weights(w2, kw.get("w2_scales"), kw.get("w2_mins")), wts, ids)


MIXES = [("int8", "int8"), ("int8-g16", "int8-g16"), ("int8-g16-mins", "int8"), ("int4-g16", "int4-g16"),
         ("int4-g16", "int8"), (None, "int8-g16")]
MIX_IDS = [f"{a}+{b}" for a, b in MIXES]


@pytest.mark.parametrize("fmt13,fmt2", MIXES, ids=MIX_IDS)
def test_reference_is_the_float_op_over_dequantized_experts(fmt13, fmt2):
    case, kw = qcase(7, 8, 2, torch.float32, fmt13, fmt2, seed=1)
    out = reference.fused_moe(*case, **kw)
    assert torch.equal(out, reference.fused_moe(*dequantized(case, kw)))
    # and the quantization is visible: the float experts it came from give another output
    floats, _ = qcase(7, 8, 2, torch.float32, None, None, seed=1)
    assert not torch.equal(out, reference.fused_moe(*floats))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt13,fmt2", MIXES, ids=MIX_IDS)
@pytest.mark.parametrize("t,e,k", QCASES)
def test_torch_backend_quantized(t, e, k, fmt13, fmt2, dtype):
    case, kw = qcase(t, e, k, dtype, fmt13, fmt2, seed=t + e + k)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(torch_backend.fused_moe(*case, **kw), reference.fused_moe(*case, **kw),
                               atol=atol, rtol=rtol)


def _cpp_qparams() -> list:
    out = []
    for isa in MOE_ISAS:
        for i, (t, e, k) in enumerate(QCASES):
            for j, (a, b) in enumerate(MIXES):
                if isa == MOE_ISAS[-1] or (i + j) % 2 == 0:  # every mix on the widest variant, half on the others
                    out.append(pytest.param(isa, t, e, k, a, b, id=f"{isa}-{t}-{e}-{k}-{a}+{b}"))
    return out


@pytest.mark.usefixtures("forced_isa", "threads")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("isa,t,e,k,fmt13,fmt2", _cpp_qparams())
def test_cpp_quantized(isa, t, e, k, fmt13, fmt2, dtype, caplog):
    """The compiled kernel itself (no fallback: the log stays silent) on each instruction-set variant."""
    cpp = _cpp()
    case, kw = qcase(t, e, k, dtype, fmt13, fmt2, seed=t + e + k)
    with caplog.at_level("WARNING", logger="fastinfer.ops"):
        out = cpp.fused_moe(*case, **kw)
    assert "torch backend" not in caplog.text
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, reference.fused_moe(*case, **kw), atol=atol, rtol=rtol)


@pytest.mark.usefixtures("forced_isa")
@pytest.mark.parametrize("threads", [2], indirect=True, ids=["2threads"])
@pytest.mark.parametrize("fmt", ["int8", "int4-g32"])
@pytest.mark.parametrize("isa", MOE_ISAS)
def test_cpp_quantized_big_and_threaded(isa, fmt, threads):
    """Layer sizes that split both phases over 2 threads, int4 group 32 (Q4_K's), per-channel int8."""
    cpp = _cpp()
    case, kw = qcase(19, 8, 2, torch.bfloat16, fmt, fmt, seed=3, hidden=512, inter=352)
    for n in (1, 19):
        sub = (case[0][:n], case[1], case[2], case[3][:n], case[4][:n])
        torch.testing.assert_close(cpp.fused_moe(*sub, **kw), reference.fused_moe(*sub, **kw), atol=2e-2,
                                   rtol=2e-2)


def test_cpp_quantized_reads_only_chosen_experts_and_falls_back_loudly(caplog):
    """NaN scales in experts no token chose never reach the output; a group the kernel lacks (8) runs on the torch
    backend, logged, with the same result."""
    cpp = _cpp()
    case, kw = qcase(5, 8, 2, torch.float32, "int4-g16", "int8", seed=1)  # odd seed: even experts only
    poisoned = {n: t.clone() for n, t in kw.items()}
    for n in poisoned:
        poisoned[n][1::2] = float("nan")
    out = cpp.fused_moe(*case, **poisoned)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference.fused_moe(*case, **kw), atol=1e-5, rtol=1e-5)
    case8, kw8 = qcase(5, 8, 2, torch.float32, "int8-g8", "int8-g8", seed=2)
    with caplog.at_level("WARNING", logger="fastinfer.ops"):
        out8 = cpp.fused_moe(*case8, **kw8)
    assert "group size 8" in caplog.text and "torch backend" in caplog.text
    torch.testing.assert_close(out8, reference.fused_moe(*case8, **kw8), atol=1e-5, rtol=1e-5)


def test_cpp_quantized_bad_inputs():
    cpp = _cpp()
    case, kw = qcase(3, 4, 2, torch.float32, "int8", "int4-g16")
    with pytest.raises(ValueError, match="scales / mins must be contiguous fp32"):
        torch.ops.fastinfer.fused_moe(*case, kw["w13_scales"].double(), None, kw["w2_scales"], kw["w2_mins"])
    with pytest.raises(ValueError, match="does not fit"):
        torch.ops.fastinfer.fused_moe(case[0], case[1][:, :, :-1].contiguous(), *case[2:], **kw)
    with pytest.raises(ValueError, match="must be int8 or uint8"):
        torch.ops.fastinfer.fused_moe(case[0], case[1].int(), *case[2:], **kw)
    x, _, w2, wts, ids = case
    with pytest.raises(ValueError, match="mins without scales"):
        torch.ops.fastinfer.fused_moe(x, torch.zeros(4, 2 * INTER, HIDDEN), w2, wts, ids, None,
                                      kw["w2_scales"], kw["w2_scales"], kw["w2_mins"])
    assert cpp.fused_moe(x[:0], case[1], w2, wts[:0], ids[:0], **kw).shape == (0, HIDDEN)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("fmt13,fmt2", [("int8", "int8"), ("int4-g16", "int4-g16"), ("int4-g16", "int8-g16-mins"),
                                        (None, "int8")], ids=["int8", "int4", "int4+int8mins", "float+int8"])
@pytest.mark.parametrize("t,e,k", [(1, 4, 2), (33, 64, 8), (20, 8, 2)])
def test_triton_quantized(t, e, k, fmt13, fmt2, dtype):
    from fastinfer.ops import triton_backend

    case, kw = qcase(t, e, k, dtype, fmt13, fmt2, seed=t + e + k)
    dev = TRITON_DEVICE
    assert dev is not None
    case = tuple(u.to(dev) for u in case)
    kw = {n: u.to(dev) for n, u in kw.items()}
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(triton_backend.fused_moe(*case, **kw), reference.fused_moe(*case, **kw),
                               atol=atol, rtol=rtol)
