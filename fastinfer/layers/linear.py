"""Dense linear layers. Parameters are allocated uninitialised: weights always come from a checkpoint."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """``y = x @ W.T + b`` with W [out, in]. ``shard_sizes`` names the output rows of fused projections
    (e.g. q/k/v), so a loader can copy each checkpoint tensor into its slice."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, shard_sizes: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.shard_sizes = shard_sizes or (out_features,)
        assert sum(self.shard_sizes) == out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def load_shard(self, name: str, shard: int, tensor: torch.Tensor) -> None:
        """Copy a checkpoint tensor (``name`` is ``weight`` or ``bias``) into output shard ``shard``."""
        param = self.weight if name == "weight" else self.bias
        if param is None:
            raise ValueError(f"checkpoint has a {name} this layer does not")
        start = sum(self.shard_sizes[:shard])
        size = self.shard_sizes[shard]
        expected = (size, *param.shape[1:])
        if tuple(tensor.shape) != expected:
            raise ValueError(f"shape mismatch for {name} shard {shard}: checkpoint {tuple(tensor.shape)}, "
                             f"model expects {expected}")
        param.data[start:start + size].copy_(tensor)
