"""Paged KV-cache writes in Triton: ``store_kv`` scatters this step's keys/values into their slots and
``copy_blocks`` copies whole blocks (copy-on-write forks)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
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
    dst = blk * stride_kcb + off * stride_kcs + offs_h[:, None] * stride_kch + offs_d[None, :]
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    src_h = offs_h[:, None] * stride_vh + offs_d[None, :]
    v = tl.load(value_ptr + t.to(tl.int64) * stride_vt + src_h, mask=mask)
    dst = blk * stride_vcb + off * stride_vcs + offs_h[:, None] * stride_vch + offs_d[None, :]
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def check_store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Shapes, dtypes, strides and devices of :func:`store_kv`'s inputs (metadata only)."""
    assert key.dim() == 3 and key.shape == value.shape, f"key/value must be [T, Hkv, D]: {key.shape} {value.shape}"
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, "caches must be [num_blocks, block_size, Hkv, D]"
    assert key.shape[1:] == k_cache.shape[2:], f"key heads/dim {tuple(key.shape[1:])} != cache {k_cache.shape[2:]}"
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
        num_warps=4 if block_h * block_d >= 1024 else 1,
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
