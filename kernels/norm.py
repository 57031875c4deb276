"""RMSNorm in Triton, plain and with a fused residual add. fp32 math; HF convention
``weight * (x_normed cast to the input dtype)``."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX_HIDDEN = 65536  # one row per program, held in registers


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps,
    stride_x, stride_r, stride_o, stride_ro,
    BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    """Grid (rows,): normalise one row; with HAS_RESIDUAL first form ``x + residual`` (rounded to the input
    dtype, as torch adds) and store that sum too."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + row * stride_ro + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    normed = (xf * rstd).to(x.dtype)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    out = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., N] -> [rows, N] with a dense last dim (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def check_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> torch.dtype:
    """Shapes, dtypes and devices of the RMSNorm inputs (metadata only); returns the output dtype."""
    n = x.shape[-1]
    assert weight.shape == (n,) and weight.is_contiguous(), f"weight must be [{n}] contiguous"
    assert n <= _MAX_HIDDEN, f"hidden size {n} > {_MAX_HIDDEN}"
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported dtype {x.dtype}"
    assert weight.device == x.device, f"weight on device {weight.device}, x on {x.device}"
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype, "residual must match x"
        assert residual.device == x.device, f"residual on device {residual.device}, x on {x.device}"
    return torch.promote_types(weight.dtype, x.dtype)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    n = x.shape[-1]
    out_dtype = check_rms_norm(x, residual, weight)
    x2 = _rows(x)  # [R, N]
    out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    if residual is not None:
        r2 = _rows(residual)
        res_out = torch.empty_like(x2)
    else:
        r2 = res_out = x2  # unused
    if x2.shape[0]:
        block = triton.next_power_of_2(n)
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, out, res_out, n, eps,
            x2.stride(0), r2.stride(0), out.stride(0), res_out.stride(0),
            BLOCK=block, HAS_RESIDUAL=residual is not None,
            num_warps=min(16, max(1, block // 512)),
        )
    out = out.view(*x.shape[:-1], n)
    return out, (res_out.view(x.shape) if residual is not None else None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of ``x`` [..., N] over its last dim, scaled by ``weight`` [N]."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = residual + x``; returns ``(rms_norm(s), s)`` as new tensors (inputs are not modified)."""
    out, res = _launch(x, residual, weight, eps)
    assert res is not None
    return out, res
