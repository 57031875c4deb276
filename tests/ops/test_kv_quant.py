"""The quantized KV cache (int8 and fp8 e4m3 rows with an fp16 scale per token and KV head).

First the spec itself (``ops.reference.quantize_kv_rows`` / ``dequantize_kv``) against an independent NumPy
computation of the scale and codes, then the reference ops on quantized caches, then every CPU backend against the
reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastinfer.ops import reference
from tests.ops.paged_cases import paged_case

KINDS = ["int8", "fp8_e4m3"]
QMAX = {"int8": 127.0, "fp8_e4m3": 448.0}


def numpy_scale(row: np.ndarray, kind: str) -> np.float16:
    """The row's fp16 scale by the spec, computed in NumPy (NaN ignored; no finite element -> 65504)."""
    if not np.isfinite(row).any():
        return np.float16(65504)
    amax = np.float32(np.nanmax(np.abs(row)))
    with np.errstate(over="ignore"):  # beyond fp16: inf, then clamped
        s = np.float16(max(amax / np.float32(QMAX[kind]), np.float32(2.0 ** -14)))
    return np.float16(min(float(s), 65504.0))


def e4m3_grid() -> np.ndarray:
    """Every finite float8_e4m3fn value (fp32), from its 256 bit patterns."""
    vals = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    return np.unique(vals[np.isfinite(vals)])


def rows_under_test() -> torch.Tensor:
    """Random rows plus the edge cases: all zero, all NaN, one NaN, +-inf, tiny, huge, beyond fp16 * QMAX."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(24, 64, generator=gen) * torch.logspace(-6, 4, 24).unsqueeze(1)
    edge = torch.randn(8, 64, generator=gen)
    edge[0] = 0.0
    edge[1] = float("nan")
    edge[2, 5] = float("nan")
    edge[3, 7], edge[3, 9] = float("inf"), float("-inf")
    edge[4] = 1e-30
    edge[5] = 1e4
    edge[6] = 1e9  # amax / QMAX beyond fp16: the scale saturates at 65504, the codes at QMAX
    edge[7, :32] = float("nan")
    edge[7, 32:] = float("inf")
    return torch.cat([x, edge])


@pytest.mark.parametrize("kind", KINDS)
def test_quantize_rows_matches_numpy_spec(kind):
    x = rows_under_test()
    rows = reference.quantize_kv_rows(x, kind)
    assert rows.shape == (x.shape[0], 66) and rows.dtype == (torch.int8 if kind == "int8" else torch.uint8)
    raw = rows.numpy().view(np.uint8)
    scales16 = (raw[:, 64].astype(np.uint16) | (raw[:, 65].astype(np.uint16) << 8)).view(np.float16)  # LE
    grid = e4m3_grid()
    for r in range(x.shape[0]):
        row = x[r].numpy()
        s = numpy_scale(row, kind)
        assert scales16[r] == s, (r, scales16[r], s)
        assert np.isfinite(scales16[r]) and scales16[r] > 0
        y = np.clip(np.nan_to_num(row / np.float32(s), nan=0.0), -QMAX[kind], QMAX[kind])
        if kind == "int8":
            np.testing.assert_array_equal(rows[r, :64].numpy(), np.rint(y).astype(np.int8))
        else:
            got = rows[r, :64].view(torch.float8_e4m3fn).float().numpy()
            dist = np.abs(grid[None, :] - y[:, None])
            nearest = grid[dist.argmin(axis=1)]
            d = np.sort(dist, axis=1)
            tie = d[:, 0] == d[:, 1]  # halfway between two codes: either is a rounding (torch's is even)
            np.testing.assert_array_equal(got[~tie], nearest[~tie])
    deq = reference.dequantize_kv(rows)
    assert deq.dtype == torch.float32 and deq.shape == x.shape and torch.isfinite(deq).all()


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_error_bound(kind):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 4, 96, generator=gen) * 3
    x[0, 0, 0] *= 1e4  # one token's keys all large, beside small ones: its own scale, the others unaffected
    deq = reference.dequantize_kv(reference.quantize_kv_rows(x, kind))
    scale = (x.abs().amax(-1, keepdim=True) / QMAX[kind]).to(torch.float16).float()
    bound = scale / 2 if kind == "int8" else torch.maximum(x.abs() * 2 ** -4, scale * 2 ** -10)
    assert ((deq - x).abs() <= bound * 1.0001 + 1e-12).all()
    small = deq[0, 1:] - x[0, 1:]
    assert small.abs().max() < 0.05 * (3 if kind == "int8" else 8)


@pytest.mark.parametrize("kind", KINDS)
def test_scales_never_zero_or_nan(kind):
    x = torch.zeros(4, 2, 32)
    x[1] = float("nan")
    x[2, 0, 3] = float("nan")
    x[3] = float("-inf")
    rows = reference.quantize_kv_rows(x, kind)
    scale = rows[..., 32:].contiguous().view(torch.float16).float()
    assert torch.isfinite(scale).all() and (scale > 0).all()
    deq = reference.dequantize_kv(rows)
    assert torch.isfinite(deq).all()
    assert (deq[0] == 0).all() and (deq[1] == 0).all() and deq[2, 0, 3] == 0
    assert (deq[3] == -QMAX[kind] * 65504).all()


def test_kv_quant_dtype():
    assert reference.kv_quant_dtype(torch.empty(1, dtype=torch.bfloat16)) is None
    assert reference.kv_quant_dtype(torch.empty(1, dtype=torch.int8)) == "int8"
    assert reference.kv_quant_dtype(torch.empty(1, dtype=torch.uint8)) == "fp8_e4m3"
    with pytest.raises(ValueError, match="int32"):
        reference.kv_quant_dtype(torch.empty(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="unknown KV quantization"):
        reference.quantize_kv_rows(torch.zeros(2, 4), "int4")
    with pytest.raises(ValueError, match="float32"):
        reference.dequantize_kv(torch.zeros(2, 6))


@pytest.mark.parametrize("kind", KINDS)
def test_reference_ops_on_quantized_cache(kind):
    """Reference store_kv writes exactly quantize_kv_rows' rows, and reference paged_attention on the quantized
    cache equals it on a float cache holding the dequantized values (NaN-poisoned unwritten slots unread)."""
    q, kc, vc, meta = paged_case([1, 1, 9], [5, 40, 33], 6, 2, 64, 16, torch.float32, seed=3,
                                 kv_cache_dtype=kind)
    slots = meta.slot_mapping
    gen = torch.Generator().manual_seed(4)
    key, value = torch.randn(len(slots), 2, 64, generator=gen), torch.randn(len(slots), 2, 64, generator=gen)
    reference.store_kv(key, value, kc, vc, slots)
    flat = kc.view(-1, 2, 66)
    torch.testing.assert_close(flat[slots.long()], reference.quantize_kv_rows(key, kind), rtol=0, atol=0)
    kf, vf = reference.dequantize_kv(kc), reference.dequantize_kv(vc)  # poisoned slots: NaN scales
    assert torch.isnan(kf).any()
    out = reference.paged_attention(q, kc, vc, meta, 0.125)
    torch.testing.assert_close(out, reference.paged_attention(q, kf, vf, meta, 0.125), rtol=0, atol=0)
    assert torch.isfinite(out).all()
