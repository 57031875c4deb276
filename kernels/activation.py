"""Gated activations in Triton: ``silu_and_mul`` (SwiGLU)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, d, stride_x, stride_o, BLOCK: tl.constexpr):
    """Grid (rows, column blocks): ``silu(x[:d]) * x[d:]``; silu in fp32, rounded to the input dtype before the
    product (as torch does)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < d
    a = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    b = tl.load(x_ptr + row * stride_x + d + offs, mask=mask, other=0.0)
    af = a.to(tl.float32)
    act = (af / (1.0 + tl.exp(-af))).to(a.dtype)
    tl.store(out_ptr + row * stride_o + offs, act * b, mask=mask)


def check_silu_and_mul(x: torch.Tensor) -> None:
    """The input of :func:`silu_and_mul` (metadata only)."""
    assert x.dim() >= 1 and x.shape[-1] % 2 == 0, f"last dim {x.shape[-1]} must be even"


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for ``x`` [..., 2d]; returns [..., d]."""
    check_silu_and_mul(x)
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], d, dtype=x.dtype, device=x.device)  # [R, d]
    if out.numel():
        block = min(1024, triton.next_power_of_2(d))
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](
            x2, out, d, x2.stride(0), out.stride(0), BLOCK=block, num_warps=4)
    return out.view(*x.shape[:-1], d)
