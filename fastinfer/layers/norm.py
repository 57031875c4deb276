"""RMSNorm with an optional fused residual add."""
from __future__ import annotations

import torch
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
