"""RMSNorm, Gemma's (1 + w) RMSNorm and LayerNorm, each with an optional fused residual add."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastinfer.ops import OpSet


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, ops: OpSet, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.eps = eps
        self.ops = ops
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.fused_add_rms_norm(x, residual, self.weight, self.eps)


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias (GPT-2, GPT-NeoX), the same call shape as :class:`RMSNorm` (optional
    fused residual add). Plain torch ``layer_norm``: the op set has no LayerNorm kernel yet."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
        s = residual + x
        return F.layer_norm(s, self.weight.shape, self.weight, self.bias, self.eps), s


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: normalise and scale by ``1 + weight`` in fp32, then cast back to x's dtype (the checkpoint
    stores ``weight`` zero-centred), with :class:`RMSNorm`'s call shape (optional fused residual add, the sum in
    x's dtype). Plain torch: the op set's ``rms_norm`` scales after casting back (the Llama convention)."""

    def __init__(self, hidden_size: int, eps: float, ops: OpSet | None = None, dtype: torch.dtype = torch.float32,
                 ) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        s = x if residual is None else residual + x
        xf = s.float()
        out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight.float())).to(s.dtype)
        return out if residual is None else (out, s)
