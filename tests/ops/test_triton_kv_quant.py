"""The Triton kernels on a quantized KV cache (int8 and fp8 e4m3 rows ``[..., D + 2]`` with an fp16 scale, the spec
of :func:`fastinfer.ops.reference.quantize_kv_rows`) against fastinfer.ops.reference. On CPU they run under
TRITON_INTERPRET=1 (set by tests/conftest.py); the interpreter's fp32 -> fp8 conversion rounds wrongly across
exponent boundaries, which is why store_kv encodes e4m3 in integer arithmetic (exact here and on a GPU)."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

from fastinfer.kernels.attention import paged_decode_triton  # noqa: E402

from fastinfer.ops import reference  # noqa: E402
from fastinfer.ops import triton_backend as tb  # noqa: E402
from tests.ops.test_triton_kernels import DEVICE, _close, paged_case  # noqa: E402

KINDS = ["int8", "fp8_e4m3"]
CACHE_DTYPE = {"int8": torch.int8, "fp8_e4m3": torch.uint8}


# (query_lens, seq_lens, H, Hkv, D, block_size, dtype, window): decode rows first
CASES = {
    "mixed-mha-fp32": ([1, 1, 17], [17, 33, 40], 4, 4, 64, 16, torch.float32, None),
    "mixed-gqa4-d128-fp16": ([1, 33], [1, 33], 8, 2, 128, 8, torch.float16, None),
    "mixed-mqa-bs32-fp32": ([1, 1, 5], [64, 7, 70], 8, 1, 64, 32, torch.float32, None),
    "prefill-ctx-d80-fp16": ([1, 9, 3], [50, 9, 41], 4, 2, 80, 16, torch.float16, None),
    "window-gqa3-fp16": ([1, 1, 20], [40, 5, 45], 9, 3, 64, 16, torch.float16, 7),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_paged_attention_quantized(case, kind):
    """Both kernels (the decode rows and the varlen prefill rows of each batch) read codes and scales in the
    dot products; unwritten slots hold 0x7F bytes (a NaN fp16 scale) and must never be read."""
    qlens, slens, h, hkv, d, bs, dtype, window = case
    q, kc, vc, meta = paged_case(qlens, slens, h, hkv, d, bs, dtype, kv_cache_dtype=kind)
    assert kc.dtype == CACHE_DTYPE[kind] and kc.shape[-1] == d + 2
    out = tb.paged_attention(q, kc, vc, meta, d ** -0.5, window)
    _close(out, reference.paged_attention(q, kc, vc, meta, d ** -0.5, window), dtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_split_kv_quantized(kind, num_splits):
    slens = [1, 17, 100, 257]
    q, kc, vc, meta = paged_case([1] * 4, slens, 8, 2, 64, 16, torch.float16, seed=2, kv_cache_dtype=kind)
    out = torch.empty_like(q)
    paged_decode_triton(q, kc, vc, out, meta.block_table, meta.seq_lens, max(slens), 0.125, 40, num_splits,
                        softcap=2.0)
    _close(out, reference.paged_attention(q, kc, vc, meta, 0.125, 40, 2.0), torch.float16)


def _extreme_rows(t: int, num_kv: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Random rows plus the edge cases of the scale: a token whose keys are all large (1e4, past fp16's range
    once divided by a small scale), an all-zero row, rows with NaN / inf elements, a row with no finite
    element, tiny values under fp16's smallest normal scale, and values on fp8 rounding ties."""
    x = torch.randn(t, num_kv, head_dim)
    x[1] = 1.0e4 * torch.sign(torch.randn(num_kv, head_dim))
    x[2, 0] = 0.0
    x[3, 0, 5], x[3, -1, 7] = float("nan"), float("inf")
    x[4, 0] = float("nan")
    x[4, -1] = float("-inf")
    x[5] = 1e-9 * torch.randn(num_kv, head_dim)
    x[6, 0] = torch.arange(head_dim, dtype=torch.float32) * 0.0625 + 0.03125  # halfway points
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)  # 1e4 fits fp16; keep NaN / inf as they are
        x[3, -1, 7] = float("inf")
    return x.to(DEVICE, dtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_size,num_kv,head_dim", [(16, 2, 64), (8, 3, 80)])
def test_store_kv_quantized_is_bit_exact(kind, dtype, block_size, num_kv, head_dim):
    """store_kv quantises each row exactly as the spec: same codes, same fp16 scale bytes (so every backend
    reads the same cache); strided key / value views, padding slots skipped, untouched slots keep their bytes."""
    t = 17
    rows = _extreme_rows(2 * t, num_kv, head_dim, dtype)
    qkv = torch.cat([rows[:t], rows[t:], torch.zeros_like(rows[:t])], dim=-1)  # k, v as strided views
    key, value = qkv[..., :head_dim], qkv[..., head_dim:2 * head_dim]
    slots = torch.randperm(6 * block_size)[:t].to(DEVICE)
    slots[[9, 12]] = -1  # padding tokens
    shape = (6, block_size, num_kv, head_dim + 2)
    kc, vc = (torch.full(shape, 0x7F, dtype=CACHE_DTYPE[kind], device=DEVICE) for _ in range(2))
    kr, vr = kc.clone(), vc.clone()
    tb.store_kv(key, value, kc, vc, slots)
    reference.store_kv(key, value, kr, vr, slots)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)
    scales = reference.dequantize_kv(kc.view(-1, num_kv, head_dim + 2)[slots[slots >= 0]])
    assert torch.isfinite(scales).all()
    scale16 = kc.view(-1, num_kv, head_dim + 2)[slots[slots >= 0], :, head_dim:].contiguous().view(torch.float16)
    assert (scale16.float() > 0).all() and torch.isfinite(scale16).all(), "a scale is zero, inf or NaN"


@pytest.mark.parametrize("kind", KINDS)
def test_copy_blocks_quantized(kind):
    """Copy-on-write copies codes and scales together (they share the block)."""
    kc = torch.randint(-127, 128, (9, 8, 2, 66), dtype=torch.int16).to(DEVICE, CACHE_DTYPE[kind])
    vc = torch.randint(-127, 128, (9, 8, 2, 66), dtype=torch.int16).to(DEVICE, CACHE_DTYPE[kind])
    kr, vr = kc.clone(), vc.clone()
    pairs = torch.tensor([[2, 5], [0, 7], [3, 1]], dtype=torch.int64, device=DEVICE)
    tb.copy_blocks(kc, vc, pairs)
    reference.copy_blocks(kr, vr, pairs)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)


def test_quantized_cache_checks():
    q, kc, vc, meta = paged_case([1, 3], [5, 3], 4, 2, 64, 16, torch.float16, kv_cache_dtype="int8")
    with pytest.raises(AssertionError, match="cache rows must have 66"):
        tb.paged_attention(q, kc[..., :64], vc[..., :64], meta, 0.1)
    with pytest.raises(AssertionError, match="dtypes differ"):
        tb.paged_attention(q, kc, vc.view(torch.uint8), meta, 0.1)
    with pytest.raises(AssertionError, match="need cache rows"):
        tb.store_kv(q[:, :2], q[:, :2], kc[..., :64].contiguous(), vc[..., :64].contiguous(),
                    torch.zeros(q.shape[0], dtype=torch.int64, device=DEVICE))
