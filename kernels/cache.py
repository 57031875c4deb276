"""Paged KV-cache writes in Triton: ``store_kv`` scatters this step's keys/values into their slots (quantising each
row for an int8 / fp8 cache) and ``copy_blocks`` copies whole blocks (copy-on-write forks; a quantized block
carries its scales in its rows)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastinfer.kernels.attention import kv_quant_kind


@triton.jit
def _round_half_even(y):
    """``torch.round`` (ties to even) of fp32 ``y``; exact for |y| < 2**22."""
    r = tl.floor(y + 0.5)
    tie = (r - y) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _e4m3_bits(y):
    """float8 e4m3fn bits (uint8) of fp32 ``y`` with |y| <= 448, rounded to nearest even, as torch's
    ``.to(torch.float8_e4m3fn)``; done in integer arithmetic because the Triton interpreter's fp8 conversion
    rounds across exponent boundaries wrongly. With ``E = max(floor(log2 |y|), -6)``, the code is
    ``8 * (E + 6) + round(|y| * 2**(3 - E))``: one formula for normal and subnormal values, a mantissa that
    rounds up to 16 carries into the exponent by itself."""
    a = tl.abs(y)
    e = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    step = ((130 - e) << 23).to(tl.float32, bitcast=True)  # 2 ** (3 - E), exact
    code = 8 * (e + 6) + _round_half_even(a * step).to(tl.int32)
    sign = (y.to(tl.int32, bitcast=True) >> 24) & 0x80
    return (code | sign).to(tl.uint8)


@triton.jit
def _store_rows(x, dst_ptr, row, offs_d, mask, HEAD_DIM: tl.constexpr, KV_QUANT: tl.constexpr):
    """Store rows ``x`` [H, D] into the cache rows starting at element offsets ``row`` [H]: converted to the
    cache's dtype (a float cache), or quantised per row (``KV_QUANT`` 1: int8, 2: fp8 e4m3) with the row's fp16
    scale in its last 2 bytes: the spec of :func:`fastinfer.ops.reference.quantize_kv_rows` (scale
    ``max(amax / QMAX, 2**-14)`` at most 65504, rounded to fp16 before the codes are made from it; NaN elements
    give 0, infinities saturate, a row without a finite element gets the largest scale)."""
    dst = row[:, None] + offs_d[None, :]
    if KV_QUANT == 0:
        tl.store(dst_ptr + dst, x.to(dst_ptr.dtype.element_ty), mask=mask)
    else:
        QMAX: tl.constexpr = 127.0 if KV_QUANT == 1 else 448.0
        x = x.to(tl.float32)
        a = tl.where(mask & (x == x), tl.abs(x), 0.0)  # NaN ignored; inf kept (saturates the scale)
        any_finite = tl.max(((a < float("inf")) & (x == x) & mask).to(tl.int32), 1) > 0
        amax = tl.where(any_finite, tl.max(a, 1), float("inf"))  # [H]; no finite element: the largest scale
        scale = tl.minimum(tl.maximum(amax / QMAX, 6.103515625e-05), 65504.0).to(tl.float16)
        y = x / scale.to(tl.float32)[:, None]
        y = tl.where(y == y, tl.minimum(tl.maximum(y, -QMAX), QMAX), 0.0)
        if KV_QUANT == 1:
            tl.store(dst_ptr + dst, _round_half_even(y).to(tl.int8), mask=mask)
        else:
            tl.store(dst_ptr + dst, _e4m3_bits(y), mask=mask)
        head_ok = tl.max(mask.to(tl.int32), 1) > 0
        tl.store((dst_ptr + row + HEAD_DIM).to(tl.pointer_type(tl.float16)), scale, mask=head_ok)


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, KV_QUANT: tl.constexpr = 0,
):
    """Grid (tokens,): token t's [Hkv, D] key and value go to slot ``slot_mapping[t]`` (skipped if negative)."""
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    blk = slot // PAGE
    off = slot % PAGE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_KV) & (offs_d[None, :] < HEAD_DIM)
    src_h = offs_h[:, None] * stride_kh + offs_d[None, :]
    k = tl.load(key_ptr + t.to(tl.int64) * stride_kt + src_h, mask=mask)
    _store_rows(k, k_cache_ptr, blk * stride_kcb + off * stride_kcs + offs_h * stride_kch, offs_d, mask, HEAD_DIM,
                KV_QUANT)
    src_h = offs_h[:, None] * stride_vh + offs_d[None, :]
    v = tl.load(value_ptr + t.to(tl.int64) * stride_vt + src_h, mask=mask)
    _store_rows(v, v_cache_ptr, blk * stride_vcb + off * stride_vcs + offs_h * stride_vch, offs_d, mask, HEAD_DIM,
                KV_QUANT)


def check_store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Shapes, dtypes, strides and devices of :func:`store_kv`'s inputs (metadata only)."""
    assert key.dim() == 3 and key.shape == value.shape, f"key/value must be [T, Hkv, D]: {key.shape} {value.shape}"
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, "caches must be [num_blocks, block_size, Hkv, D]"
    row = key.shape[2] + (2 if kv_quant_kind(k_cache) else 0)  # a quantized row: D codes + its fp16 scale
    assert (key.shape[1], row) == tuple(k_cache.shape[2:]), \
        f"key heads/dim {tuple(key.shape[1:])} need cache rows {(key.shape[1], row)}, not {tuple(k_cache.shape[2:])}"
    assert k_cache.dtype == v_cache.dtype, f"k / v cache dtypes differ: {k_cache.dtype} vs {v_cache.dtype}"
    assert slot_mapping.shape == (key.shape[0],), "one slot per token"
    assert slot_mapping.dtype in (torch.int32, torch.int64), "slot_mapping must be an integer tensor"
    assert key.stride(2) == value.stride(2) == k_cache.stride(3) == v_cache.stride(3) == 1, "head dim contiguous"
    assert len({key.device, value.device, k_cache.device, v_cache.device, slot_mapping.device}) == 1, \
        "key, value, caches and slot_mapping must be on one device"


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write ``key``/``value`` [T, Hkv, D] into ``k_cache``/``v_cache`` [num_blocks, block_size, Hkv, D] at the
    flat slots ``slot_mapping`` [T] (``block * block_size + offset``); negative slots are skipped."""
    check_store_kv(key, value, k_cache, v_cache, slot_mapping)
    num_tokens, num_kv, head_dim = key.shape
    if num_tokens == 0:
        return
    block_h, block_d = triton.next_power_of_2(num_kv), triton.next_power_of_2(head_dim)
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping.contiguous(),
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        NUM_KV=num_kv, HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=block_d, PAGE=k_cache.shape[1],
        KV_QUANT=kv_quant_kind(k_cache), num_warps=4 if block_h * block_d >= 1024 else 1,
    )


@triton.jit
def _copy_blocks_kernel(k_cache_ptr, v_cache_ptr, pairs_ptr, block_numel, BLOCK: tl.constexpr):
    """Grid (pairs, chunks of one block): copy chunk of block ``src`` onto block ``dst`` in both caches."""
    i = tl.program_id(0)
    chunk = tl.program_id(1)
    src = tl.load(pairs_ptr + 2 * i).to(tl.int64)
    dst = tl.load(pairs_ptr + 2 * i + 1).to(tl.int64)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < block_numel
    tl.store(k_cache_ptr + dst * block_numel + offs, tl.load(k_cache_ptr + src * block_numel + offs, mask=mask),
             mask=mask)
    tl.store(v_cache_ptr + dst * block_numel + offs, tl.load(v_cache_ptr + src * block_numel + offs, mask=mask),
             mask=mask)


def check_copy_blocks(k_cache: torch.Tensor, v_cache: torch.Tensor, src_to_dst: torch.Tensor) -> None:
    """Shapes, dtypes, layout and devices of :func:`copy_blocks`'s inputs (metadata only)."""
    assert k_cache.shape == v_cache.shape and k_cache.dtype == v_cache.dtype, "k/v caches must match"
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "caches must be contiguous"
    assert src_to_dst.dim() == 2 and src_to_dst.shape[1] == 2, "src_to_dst must be [N, 2]"
    assert src_to_dst.dtype == torch.int64, "src_to_dst must be int64"
    assert k_cache.device == v_cache.device == src_to_dst.device, "caches and src_to_dst must be on one device"


def copy_blocks(k_cache: torch.Tensor, v_cache: torch.Tensor, src_to_dst: torch.Tensor) -> None:
    """For each row ``(src, dst)`` of ``src_to_dst`` [N, 2] int64, copy block ``src`` of both caches
    [num_blocks, block_size, Hkv, D] onto block ``dst``. Pairs run in parallel: no ``dst`` may also be a
    ``src`` (copy-on-write always copies into freshly allocated blocks)."""
    check_copy_blocks(k_cache, v_cache, src_to_dst)
    if src_to_dst.shape[0] == 0:
        return
    block_numel = k_cache[0].numel()
    block = min(4096, triton.next_power_of_2(block_numel))
    _copy_blocks_kernel[(src_to_dst.shape[0], triton.cdiv(block_numel, block))](
        k_cache, v_cache, src_to_dst.contiguous(), block_numel, BLOCK=block, num_warps=4)
