"""The quantized KV cache (int8 and fp8 e4m3 rows with an fp16 scale per token and KV head).

First the spec itself (``ops.reference.quantize_kv_rows`` / ``dequantize_kv``) against an independent NumPy
computation of the scale and codes, then the reference ops on quantized caches, then every CPU backend against the
reference."""
from __future__ import annotations

import functools

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


# ---- the CPU backends against the reference ------------------------------------------------------------------
try:
    from fastinfer.ops import cpp_backend as cpp
except ImportError:  # the compiled extension is not built: its cases skip
    cpp = None
from fastinfer.ops import torch_backend  # noqa: E402

BACKENDS = [pytest.param(torch_backend, id="torch"),
            pytest.param(cpp, id="cpp", marks=pytest.mark.skipif(cpp is None, reason="fastinfer._C not built"))]
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-3, 8e-3), torch.float16: (5e-4, 1e-3)}


def check_attention(backend, q, k_cache, v_cache, meta, window=None, softcap=None, ref=None):
    """Backend output vs the reference on the same quantized caches (fp32 math from the same q; ``ref``: that
    reference output, computed already)."""
    scale = q.shape[-1] ** -0.5
    out = backend.paged_attention(q, k_cache, v_cache, meta, scale, window, softcap)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all(), "non-finite output: a poisoned slot leaked"
    if ref is None:
        ref = reference.paged_attention(q.float(), k_cache, v_cache, meta, scale, window, softcap)
    atol, rtol = TOL[q.dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads", [(4, 4), (9, 3), (8, 1)], ids=["mha", "gqa3", "gqa8"])
def test_attention_vs_reference(backend, kind, dtype, block_size, heads):
    # decode rows first (odd lengths), then a fresh prompt, a chunk with prior context and a longer chunk
    query_lens, seq_lens = [1, 1, 1, 17, 5, 33], [1, 37, 129, 17, 40, 101]
    case = paged_case(query_lens, seq_lens, *heads, 64, block_size, dtype, seed=5, kv_cache_dtype=kind)
    check_attention(backend, *case)
    check_attention(backend, *case, window=24)


@functools.cache
def isa_cases(dtype: torch.dtype) -> list:
    """(case, window, softcap, reference output) for :func:`test_cpp_int8_every_isa`, built once per dtype."""
    long = paged_case([1, 1, 1, 12, 40], [3, 700, 2100, 12, 1000], 12, 3, 64, 16, dtype, seed=2,
                      kv_cache_dtype="int8")
    wide = paged_case([1, 1, 20], [77, 300, 50], 8, 2, 128, 32, dtype, seed=3, kv_cache_dtype="int8")
    odd = paged_case([1, 1, 3], [45, 211, 9], 6, 2, 80, 16, dtype, seed=4, kv_cache_dtype="int8")  # head_dim 80
    out = []
    for case, window, softcap in ((long, None, None), (long, 300, 2.0), (wide, None, None), (odd, None, None)):
        q, kc, vc, meta = case
        ref = reference.paged_attention(q.float(), kc, vc, meta, q.shape[-1] ** -0.5, window, softcap)
        out.append((case, window, softcap, ref))
    return out


@pytest.mark.skipif(cpp is None, reason="fastinfer._C not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_cpp_int8_every_isa(isa, threads, dtype):
    """Every instruction-set variant (generic, AVX2, AVX-512: the conftest forces each) and 1 / 2 threads (long
    rows split into parts), with windows and soft-capping; head_dim 128 for the wider PV tiles, 80 for a head size
    that is not a multiple of 32."""
    for case, window, softcap, ref in isa_cases(dtype):
        check_attention(cpp, *case, window, softcap, ref=ref)


@pytest.mark.skipif(cpp is None, reason="fastinfer._C not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("group", [1, 2, 3, 4, 5])
def test_cpp_int8_decode_group_sizes(isa, threads, dtype, group):
    """Decode at 1-5 query heads per KV head: the avx512_bf16 variant's 16-bit integer dots (VPDPWSSD) take 1-4
    under a bf16 / fp16 model, 5 the fp32 path. Odd contexts (odd last chunks: rows go in pairs there), one long
    enough to be split across threads, and one decode token whose keys and values are 1e4 beside small ones (its
    probability and the other rows' both survive the 16-bit weights); every variant vs the reference."""
    q, kc, vc, meta = paged_case([1, 1, 1, 1], [1, 17, 333, 2049], 2 * group, 2, 64, 16, dtype, seed=group,
                                 kv_cache_dtype="int8")
    gen = torch.Generator().manual_seed(group)
    key = torch.randn(4, 2, 64, generator=gen) * 0.05
    value = torch.randn(4, 2, 64, generator=gen)
    key[2], value[2] = 1e4, -1e4  # the 333-token sequence's newest token
    cpp.store_kv(key.to(dtype), value.to(dtype), kc, vc, meta.slot_mapping)
    check_attention(cpp, (q.float() * 0.1).to(dtype), kc, vc, meta)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_extreme_values(backend, kind):
    """One token's keys and values all large (1e4) beside small ones, and an all-zero token: each row keeps its
    own scale, so the large token dominates the softmax and the small ones keep their precision."""
    q, kc, vc, meta = paged_case([1, 1, 6], [20, 50, 30], 6, 2, 64, 16, torch.float32, seed=7, kv_cache_dtype=kind)
    slots = meta.slot_mapping  # this step's positions: overwrite them with the extreme tokens
    gen = torch.Generator().manual_seed(8)
    key = torch.randn(len(slots), 2, 64, generator=gen) * 0.01
    value = torch.randn(len(slots), 2, 64, generator=gen)
    key[1], value[1] = 1e4, -1e4
    key[3], value[3] = 0.0, 0.0
    backend.store_kv(key, value, kc, vc, slots)
    ref_k, ref_v = kc.clone(), vc.clone()
    reference.store_kv(key, value, ref_k, ref_v, slots)
    assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)
    check_attention(backend, q * 0.1, kc, vc, meta)


def edge_tokens(dtype: torch.dtype) -> torch.Tensor:
    """[T, 2, 64] keys holding the rows of :func:`rows_under_test` (NaN, inf, 1e9, zeros...) in ``dtype``."""
    return rows_under_test().view(-1, 2, 64).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_store_kv_bit_exact(backend, kind, dtype):
    """store_kv writes exactly the reference rows (edge rows included), skips negative slots, touches nothing else."""
    key = edge_tokens(dtype)
    value = key.flip(0)
    t = key.shape[0]
    qdtype = torch.int8 if kind == "int8" else torch.uint8
    kc = torch.full((6, 4, 2, 66), 0x7F, dtype=qdtype)
    vc = kc.clone()
    slots = torch.randperm(24, generator=torch.Generator().manual_seed(9))[:t]
    slots[2] = -1
    ref_k, ref_v = kc.clone(), vc.clone()
    backend.store_kv(key, value, kc, vc, slots)
    reference.store_kv(key, value, ref_k, ref_v, slots)
    assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)
    scales = kc.view(-1, 2, 66)[slots[slots >= 0]][..., 64:].contiguous().view(torch.float16)
    assert torch.isfinite(scales).all() and (scales > 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_copy_blocks_quantized(kind):
    """copy_blocks (copy-on-write forks) moves whole quantized blocks, scales with the codes."""
    _, kc, vc, _ = paged_case([1], [40], 4, 2, 64, 16, torch.float32, kv_cache_dtype=kind)
    ref_k, ref_v = kc.clone(), vc.clone()
    pairs = torch.tensor([[0, 3], [2, 1]], dtype=torch.int64)
    torch_backend.copy_blocks(kc, vc, pairs)
    reference.copy_blocks(ref_k, ref_v, pairs)
    assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)
    assert torch.equal(kc[3], kc[0]) and torch.equal(vc[1], vc[2])


@pytest.mark.skipif(cpp is None, reason="fastinfer._C not built")
def test_cpp_fp8_runs_torch_backend():
    """fp8 e4m3 KV on the CPU: the C++ kernels do int8 only, so the call runs on the torch backend (logged once
    by the backend; the worker says so at start-up: tests/models/test_kv_quant_engine.py)."""
    q, kc, vc, meta = paged_case([1, 3], [20, 9], 4, 2, 64, 16, torch.float32, kv_cache_dtype="fp8_e4m3")
    out = check_attention(cpp, q, kc, vc, meta)
    torch.testing.assert_close(out, torch_backend.paged_attention(q, kc, vc, meta, 0.125), rtol=0, atol=0)


@pytest.mark.skipif(cpp is None, reason="fastinfer._C not built")
@pytest.mark.parametrize("op", ["store_kv", "paged_attention"])
def test_cpp_int8_opcheck(op):
    """The compiled ops' schemas and fake implementations hold for int8 caches (torch.compile, FakeTensor)."""
    q, kc, vc, meta = paged_case([1, 3], [6, 5], 4, 2, 16, 4, torch.float32, kv_cache_dtype="int8")
    gen = torch.Generator().manual_seed(0)
    t = q.shape[0]
    o = torch.ops.fastinfer
    if op == "store_kv":
        fn, args = o.store_kv, (torch.randn(t, 2, 16, generator=gen), torch.randn(t, 2, 16, generator=gen),
                                kc.clone(), vc.clone(), meta.slot_mapping)
    else:  # (paged_case wrote every position below each seq_len)
        fn, args = o.paged_attention, (q, kc, vc, meta.block_table, meta.seq_lens, meta.query_start_loc, 0.25, 0,
                                       torch.empty_like(q), 0.0)
    torch.library.opcheck(fn.default, args)


