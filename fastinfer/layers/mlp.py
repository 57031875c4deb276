"""Feed-forward blocks: the gated MLP (SwiGLU and friends, gate/up fused) and the plain two-layer MLP."""
from __future__ import annotations

import torch
from torch import nn

from fastinfer.distributed.parallel_state import tp_size
from fastinfer.distributed.sharding import divide
from fastinfer.layers.activation import get_activation
from fastinfer.layers.linear import Linear
from fastinfer.ops import OpSet


class GatedMLP(nn.Module):
    """``down_proj(act(gate) * up)`` with gate and up fused into ``gate_up_proj`` (shards (gate, up)). SiLU runs
    the op set's ``silu_and_mul``; other activations (e.g. Gemma's ``gelu_pytorch_tanh``) run in plain torch.
    Under tensor parallelism gate/up are column-parallel and down row-parallel over the intermediate size
    (``reduce=False``: the caller all-reduces the output)."""

    def __init__(self, hidden_size: int, intermediate_size: int, ops: OpSet, dtype: torch.dtype,
                 activation: str = "silu", bias: bool = False, reduce: bool = True) -> None:
        super().__init__()
        self.ops = ops
        tp = tp_size()
        n = divide(intermediate_size, tp, "intermediate_size")  # this rank's columns (all of them without TP)
        self.gate_up_proj = Linear(hidden_size, 2 * n, bias=bias, dtype=dtype, shard_sizes=(n, n), ops=ops,
                                   parallel="column" if tp > 1 else None)
        self.down_proj = Linear(n, hidden_size, bias=bias, dtype=dtype, ops=ops, parallel="row" if tp > 1 else None,
                                reduce=reduce)
        self.activation = activation
        self.act = get_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up_proj(x)
        if self.activation == "silu":
            return self.down_proj(self.ops.silu_and_mul(h))
        gate, up = h.chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class MLP(nn.Module):
    """``fc_out(act(fc_in(x)))`` (GPT-2, GPT-NeoX); the activation runs in plain torch."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, ops: OpSet, dtype: torch.dtype,
                 bias: bool = True) -> None:
        super().__init__()
        self.fc_in = Linear(hidden_size, intermediate_size, bias=bias, dtype=dtype, ops=ops)
        self.fc_out = Linear(intermediate_size, hidden_size, bias=bias, dtype=dtype, ops=ops)
        self.act = get_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))
