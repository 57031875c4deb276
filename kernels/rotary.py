"""NeoX-style (rotate-half) rotary position embedding in Triton, the semantics of
:func:`fastinfer.ops.reference.rotary_embedding`: cos/sin are cast to the input dtype and the products are
formed in that dtype, like the reference."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x_ptr, o_ptr, stride_xh, stride_oh, num_heads, cos, sin,
                  HALF: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                  BLOCK_REST: tl.constexpr):
    """Rotate the first 2*HALF features of every head of one token; copy the rest. cos/sin [BLOCK_HALF] fp32."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, BLOCK_HALF)
    mask = (offs_h[:, None] < num_heads) & (offs_r[None, :] < HALF)
    x_row = x_ptr + offs_h[:, None] * stride_xh
    o_row = o_ptr + offs_h[:, None] * stride_oh
    x1 = tl.load(x_row + offs_r[None, :], mask=mask, other=0.0)  # [H, HALF]
    x2 = tl.load(x_row + HALF + offs_r[None, :], mask=mask, other=0.0)
    c = cos.to(x1.dtype)[None, :]
    s = sin.to(x1.dtype)[None, :]
    tl.store(o_row + offs_r[None, :], x1 * c - x2 * s, mask=mask)
    tl.store(o_row + HALF + offs_r[None, :], x2 * c + x1 * s, mask=mask)
    if BLOCK_REST > 0:  # features past the rotary dims pass through
        offs_t = 2 * HALF + tl.arange(0, BLOCK_REST)
        rmask = (offs_h[:, None] < num_heads) & (offs_t[None, :] < HEAD_DIM)
        tl.store(o_row + offs_t[None, :], tl.load(x_row + offs_t[None, :], mask=rmask), mask=rmask)


@triton.jit
def _rotary_kernel(
    pos_ptr, q_ptr, k_ptr, cs_ptr, qo_ptr, ko_ptr, num_q, num_k,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh, stride_cs,
    HALF: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr,
):
    """Grid (tokens,): one token's query and key heads share one cos/sin row."""
    t = tl.program_id(0).to(tl.int64)
    p = tl.load(pos_ptr + t).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cs_ptr + p * stride_cs + offs_r, mask=offs_r < HALF, other=0.0)
    sin = tl.load(cs_ptr + p * stride_cs + HALF + offs_r, mask=offs_r < HALF, other=0.0)
    _rotate_heads(q_ptr + t * stride_qt, qo_ptr + t * stride_qot, stride_qh, stride_qoh, num_q, cos, sin,
                  HALF, HEAD_DIM, BLOCK_HQ, BLOCK_HALF, BLOCK_REST)
    _rotate_heads(k_ptr + t * stride_kt, ko_ptr + t * stride_kot, stride_kh, stride_koh, num_k, cos, sin,
                  HALF, HEAD_DIM, BLOCK_HK, BLOCK_HALF, BLOCK_REST)


def check_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """Shapes, dtypes, strides and devices of :func:`rotary_embedding`'s inputs (metadata only)."""
    assert q.dim() == 3 and k.dim() == 3 and q.shape[0] == k.shape[0] == positions.shape[0], "q [T,H,D], k [T,Hkv,D]"
    assert q.shape[2] == k.shape[2] and q.dtype == k.dtype, "q and k must share head dim and dtype"
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos_sin_cache.stride(1) == 1, "last dims must be contiguous"
    rot, head_dim = cos_sin_cache.shape[1], q.shape[2]
    assert rot % 2 == 0 and rot <= head_dim, f"rotary dim {rot} must be even and <= head dim {head_dim}"
    assert positions.device == q.device == k.device == cos_sin_cache.device, "tensors on different devices"


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` [T, H, D] and ``k`` [T, Hkv, D] at ``positions`` [T] with ``cos_sin_cache`` [max_pos, rot]
    (cos in the first half, sin in the second); features past ``rot`` are copied. Returns new tensors."""
    check_rotary(positions, q, k, cos_sin_cache)
    rot, head_dim = cos_sin_cache.shape[1], q.shape[2]
    q_out, k_out = torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(
        k, memory_format=torch.contiguous_format)  # [T, H, D], [T, Hkv, D]
    if q.shape[0] == 0:
        return q_out, k_out
    rest = head_dim - rot
    _rotary_kernel[(q.shape[0],)](
        positions.contiguous(), q, k, cos_sin_cache, q_out, k_out, q.shape[1], k.shape[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), q_out.stride(0), q_out.stride(1),
        k_out.stride(0), k_out.stride(1), cos_sin_cache.stride(0),
        HALF=rot // 2, HEAD_DIM=head_dim, BLOCK_HQ=triton.next_power_of_2(q.shape[1]),
        BLOCK_HK=triton.next_power_of_2(k.shape[1]), BLOCK_HALF=triton.next_power_of_2(rot // 2),
        BLOCK_REST=triton.next_power_of_2(rest) if rest else 0, num_warps=4,
    )
    return q_out, k_out
