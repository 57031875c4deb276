"""The compiled per-layer ops (csrc/cpu/fused_ops.cpp: RMSNorm with the residual add, rotary embedding in place,
SiLU-and-mul, greedy argmax) against ``ops.reference`` on every instruction-set variant the CPU runs (the AVX2 code
is forced on AVX-512 machines too), fp32 / bf16 / fp16, odd sizes (tails shorter than a vector), strided rows (q and
k are views into the fused qkv projection), 1 and 2 threads (the row split of prefill-sized calls), NaN / inf and
ties; plus fake-mode tracing, opcheck, errors and the logged fallback."""
from __future__ import annotations

import pytest
import torch

from fastinfer.ops import reference

pytest.importorskip("fastinfer._C", reason="compiled extension not built (pip install -e . --no-build-isolation)")
from fastinfer.ops import cpp_backend as cpp  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# fp32: sums in another order; bf16 / fp16: a value on a rounding boundary may land one ulp apart
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 1.6e-2), torch.float16: (2e-3, 2e-3)}


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    atol, rtol = TOL[a.dtype]
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@pytest.mark.usefixtures("isa", "threads")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t,h", [(1, 576), (3, 5), (7, 577), (300, 320)])  # 300 x 320 rows split over threads
def test_rms_norm_and_fused_add(t, h, dtype):
    gen = torch.Generator().manual_seed(t * h)
    x = (torch.randn(t, h, generator=gen) * 3).to(dtype)
    r = torch.randn(t, h, generator=gen).to(dtype)
    w = (1 + 0.1 * torch.randn(h, generator=gen)).to(dtype)
    _close(cpp.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6))
    out, s = cpp.fused_add_rms_norm(x, r, w, 1e-6)
    ref_out, ref_s = reference.fused_add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(s, ref_s)  # one rounding of an exact sum: the same bits
    _close(out, ref_out)
    wide = torch.randn(t, h + 9, generator=gen).to(dtype)[:, 3:3 + h]  # strided rows
    _close(cpp.rms_norm(wide, w, 1e-6), reference.rms_norm(wide, w, 1e-6))


def _qkv(t: int, hq: int, hk: int, d: int, dtype: torch.dtype, seed: int):
    """(buffer, q view, k view, v view) as the attention layer splits its fused projection."""
    buf = torch.randn(t, (hq + 2 * hk) * d, generator=torch.Generator().manual_seed(seed)).to(dtype)
    q, k, v = buf.split([hq * d, hk * d, hk * d], dim=-1)
    return buf, q.view(t, hq, d), k.view(t, hk, d), v.view(t, hk, d)


@pytest.mark.usefixtures("isa")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t,hq,hk,d,rot", [(1, 9, 3, 64, 64), (5, 4, 4, 80, 80), (3, 8, 2, 128, 40),
                                            (17, 2, 1, 32, 2), (2, 3, 1, 96, 24)])
def test_rotary_in_place_on_qkv_views(t, hq, hk, d, rot, dtype):
    """Partial rotary (rot < D: the rest untouched), half-sizes that leave a tail (20, 12, 1), GQA head counts."""
    from fastinfer.layers.rotary import cos_sin_cache

    cache = cos_sin_cache(rot, 512, 10000.0, None)
    pos = torch.randint(0, 512, (t,), generator=torch.Generator().manual_seed(t))
    buf, q, k, v = _qkv(t, hq, hk, d, dtype, seed=t + d)
    ref_q, ref_k = reference.rotary_embedding(pos, q.clone(), k.clone(), cache)
    v_before = v.clone()
    out_q, out_k = cpp.rotary_embedding(pos, q, k, cache)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()  # in place, in the buffer
    _close(q, ref_q)
    _close(k, ref_k)
    assert torch.equal(v, v_before)
    if rot < d:
        assert torch.equal(q[..., rot:], ref_q[..., rot:])


def test_rotary_rejects_positions_outside_the_cache():
    from fastinfer.layers.rotary import cos_sin_cache

    cache = cos_sin_cache(64, 16, 10000.0, None)
    _, q, k, _ = _qkv(2, 2, 1, 64, torch.float32, 0)
    with pytest.raises(ValueError, match="outside the rotary cache"):
        cpp.rotary_embedding(torch.tensor([3, 16]), q, k, cache)


@pytest.mark.usefixtures("isa", "threads")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t,d", [(1, 1536), (4, 17), (2, 1), (70, 1000)])  # 70 x 2000: split over threads
def test_silu_and_mul(t, d, dtype):
    gen = torch.Generator().manual_seed(t + d)
    x = (torch.randn(t, 2 * d, generator=gen) * 4).to(dtype)
    _close(cpp.silu_and_mul(x), reference.silu_and_mul(x))


@pytest.mark.usefixtures("isa")
def test_silu_extremes():
    """Large negative / positive inputs (exp clamping), zeros, inf and NaN: as torch's silu."""
    g = torch.tensor([-200.0, -88.0, -87.0, -20.0, -1e-8, 0.0, 1e-8, 20.0, 88.0, 89.0, 200.0, float("inf"),
                      float("-inf"), float("nan")] + [0.5] * 2)
    x = torch.cat([g, torch.full_like(g, 1.5)]).view(1, -1)
    out, ref = cpp.silu_and_mul(x), reference.silu_and_mul(x)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6, equal_nan=True)


@pytest.mark.usefixtures("isa")
@pytest.mark.parametrize("v", [1, 7, 16, 49153])
def test_argmax_first_maximum_nan_and_inf(v):
    gen = torch.Generator().manual_seed(v)
    x = torch.randn(6, v, generator=gen)
    x[1] = 0.5  # all ties: the first index
    x[2, v // 2:] = float("-inf")
    if v > 3:
        x[3, [v - 1, 2]] = 9.0  # a tie between two maxima, the later one found first in a vector
        x[4, [1, v - 2]] = float("nan")  # the first NaN wins
    x[5] = float("-inf")
    assert torch.equal(cpp.argmax(x), x.argmax(dim=-1))
    wide = torch.randn(4, v + 5, generator=gen)[:, 2:2 + v]  # strided rows
    assert torch.equal(cpp.argmax(wide), wide.argmax(dim=-1))


def test_traces_under_fake_mode_and_opcheck():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastinfer.layers.rotary import cos_sin_cache

    x, w = torch.randn(3, 40), torch.randn(40)
    _, q, k, _ = _qkv(3, 2, 1, 32, torch.float32, 1)
    cache, pos = cos_sin_cache(32, 64, 10000.0, None), torch.tensor([0, 5, 63])
    cases = [(torch.ops.fastinfer.rms_norm.default, (x, w, 1e-6)),
             (torch.ops.fastinfer.fused_add_rms_norm.default, (x, x.clone(), w, 1e-6)),
             (torch.ops.fastinfer.silu_and_mul.default, (x,)),
             (torch.ops.fastinfer.argmax_rows.default, (x,)),
             (torch.ops.fastinfer.rotary_embedding.default, (pos, q.clone(), k.clone(), cache))]
    for op, args in cases:
        torch.library.opcheck(op, args)
    with FakeTensorMode() as mode:
        fx, fw = mode.from_tensor(x), mode.from_tensor(w)
        assert cpp.rms_norm(fx, fw, 1e-6).shape == (3, 40)
        assert cpp.silu_and_mul(fx).shape == (3, 20)
        assert cpp.argmax(fx).dtype == torch.int64


def test_unsupported_inputs_fall_back_loudly(caplog):
    x = torch.randn(2, 8, dtype=torch.float64)
    with caplog.at_level("WARNING", logger="fastinfer.ops"):
        out = cpp.rms_norm(x, torch.ones(8, dtype=torch.float64), 1e-6)
        cpp.silu_and_mul(torch.randn(2, 6, dtype=torch.float64))
    assert "rms_norm on cpu torch.float64" in caplog.text and "silu_and_mul on cpu torch.float64" in caplog.text
    torch.testing.assert_close(out, reference.rms_norm(x, torch.ones(8, dtype=torch.float64), 1e-6))
    with pytest.raises(ValueError, match="weight must be"):
        torch.ops.fastinfer.rms_norm(torch.randn(2, 8), torch.ones(7), 1e-6)


def _random_bitmask(b: int, v: int, gen: torch.Generator) -> torch.Tensor:
    """Rows: all allowed, none allowed, one token, random words (with all-ones and all-zero words mixed in)."""
    w = (v + 31) // 32
    m = torch.randint(-2 ** 31, 2 ** 31 - 1, (b, w), dtype=torch.int32, generator=gen)
    m[0] = -1
    if b > 1:
        m[1] = 0
    if b > 2:
        m[2] = 0
        m[2, (v - 1) // 32] = 1 << ((v - 1) % 32) if (v - 1) % 32 < 31 else -2 ** 31
    if b > 3 and w > 2:
        m[3, ::2] = -1
        m[3, 1::3] = 0
    return m


@pytest.mark.usefixtures("isa")
@pytest.mark.parametrize("b, v", [(1, 1), (4, 31), (5, 33), (6, 64), (4, 1000), (3, 49153)])
@pytest.mark.parametrize("extra_words", [0, 2])
def test_apply_token_bitmask_equals_the_reference(b, v, extra_words):
    gen = torch.Generator().manual_seed(b * v + extra_words)
    mask = _random_bitmask(b, v + 32 * extra_words, gen)  # wider masks (a padded vocabulary) are allowed
    logits = torch.randn(b, v, generator=gen)
    logits[0, 0] = float("nan")  # an allowed NaN stays
    want = logits.clone()
    reference.apply_token_bitmask(want, mask) if v <= 1000 else _torch_mask(want, mask)
    got = logits.clone()
    cpp.apply_token_bitmask(got, mask)
    torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)
    wide = torch.randn(b, v + 9, generator=gen)[:, 3:3 + v]  # strided rows
    ref = wide.clone()
    _torch_mask(ref, mask)
    cpp.apply_token_bitmask(wide, mask)
    torch.testing.assert_close(wide, ref, rtol=0, atol=0)


def _torch_mask(logits, mask):
    from fastinfer.ops import torch_backend

    torch_backend.apply_token_bitmask(logits, mask)


def test_torch_token_bitmask_equals_the_reference_and_traces_on_fake_cuda():
    from torch._subclasses.fake_tensor import FakeTensorMode

    gen = torch.Generator().manual_seed(0)
    for b, v in [(3, 33), (5, 95), (2, 200)]:
        mask, logits = _random_bitmask(b, v, gen), torch.randn(b, v, generator=gen)
        want, got = logits.clone(), logits.clone()
        reference.apply_token_bitmask(want, mask)
        _torch_mask(got, mask)
        assert torch.equal(got, want)
    torch.library.opcheck(torch.ops.fastinfer.apply_token_bitmask.default,
                          (torch.randn(2, 40), _random_bitmask(2, 40, gen)))
    with FakeTensorMode(allow_non_fake_inputs=False):
        logits = torch.empty(2, 40, device="cuda")
        _torch_mask(logits, torch.empty(2, 2, dtype=torch.int32, device="cuda"))
        assert logits.device.type == "cuda"


def test_token_bitmask_bad_inputs():
    with pytest.raises(ValueError, match="bitmask must be"):
        torch.ops.fastinfer.apply_token_bitmask(torch.randn(2, 64), torch.zeros(2, 1, dtype=torch.int32))
