"""Linear layers, dense or weight-only quantized. Parameters are allocated uninitialised: weights always come
from a checkpoint (or from quantizing the loaded float weight)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastinfer.ops import OpSet
from fastinfer.quantization.format import QuantizedWeight, common_format
from fastinfer.quantization.methods import QuantMethod, method_for


class Linear(nn.Module):
    """``y = x @ W.T + b`` with W [out, in]. ``shard_sizes`` names the output rows of fused projections
    (e.g. q/k/v), so a loader can copy each checkpoint tensor into its slice.

    After :meth:`set_quantized` (or loading quantized shards) the float weight is dropped: ``quant`` holds the
    weight in the format of :mod:`fastinfer.quantization.format` and ``quant_method`` (a
    :class:`~fastinfer.quantization.methods.QuantMethod`) computes the output (for int8/int4: the op set's
    ``quant_linear`` kernel). The weight's tensors are buffers ``qweight``, ``scales`` and ``mins`` (so
    ``state_dict`` saves them)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, shard_sizes: tuple[int, ...] | None = None,
                 ops: OpSet | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight: nn.Parameter | None = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype),
                                                        requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.shard_sizes = shard_sizes or (out_features,)
        assert sum(self.shard_sizes) == out_features
        self.ops = ops
        self.device = self.weight.device  # where a quantized weight's tensors go (the serving device)
        self.quant: QuantizedWeight | None = None
        self.quant_method: QuantMethod | None = None
        self._pending: dict[int, QuantizedWeight] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is None:
            assert self.weight is not None
            return F.linear(x, self.weight, self.bias)
        assert self.quant_method is not None
        return self.quant_method.apply(self, x)

    @property
    def quantized(self) -> bool:
        return self.quant is not None

    def set_quantized(self, qw: QuantizedWeight, method: QuantMethod | None = None) -> None:
        """Replace the float weight by ``qw`` ([out, in] in the quantized format), applied by ``method``
        (default: the int8 / int4 method of its bits, for weights read from a file)."""
        if qw.shape != (self.out_features, self.in_features):
            raise ValueError(f"quantized weight has shape {qw.shape}, layer is {(self.out_features, self.in_features)}")
        if qw.qweight.device != self.device:
            qw = QuantizedWeight(qw.bits, qw.group_size, qw.qweight.to(self.device), qw.scales.to(self.device),
                                 None if qw.mins is None else qw.mins.to(self.device))
        self.quant = qw
        self.quant_method = method if method is not None else method_for(qw)
        self.weight = None
        for name, t in (("qweight", qw.qweight), ("scales", qw.scales), ("mins", qw.mins)):
            if name in self._buffers:
                del self._buffers[name]
            if t is not None:
                self.register_buffer(name, t)

    def load_shard(self, name: str, shard: int, tensor: torch.Tensor | QuantizedWeight) -> None:
        """Copy a checkpoint tensor (``name`` is ``weight`` or ``bias``) into output shard ``shard``. Quantized
        shards are collected and concatenated (rows) once every shard has arrived."""
        if isinstance(tensor, QuantizedWeight):
            if name != "weight":
                raise ValueError(f"a quantized {name} is not supported")
            want = (self.shard_sizes[shard], self.in_features)
            if tensor.shape != want:
                raise ValueError(f"shape mismatch for quantized weight shard {shard}: checkpoint {tensor.shape}, "
                                 f"model expects {want}")
            self._pending[shard] = tensor
            if len(self._pending) == len(self.shard_sizes):
                parts = [self._pending[i] for i in range(len(self.shard_sizes))]
                self._pending = {}
                self.set_quantized(concat_rows(parts))
            return
        param = self.weight if name == "weight" else self.bias
        if param is None:
            raise ValueError(f"checkpoint has a {name} this layer does not (or the layer is quantized)")
        start = sum(self.shard_sizes[:shard])
        size = self.shard_sizes[shard]
        expected = (size, *param.shape[1:])
        if tuple(tensor.shape) != expected:
            raise ValueError(f"shape mismatch for {name} shard {shard}: checkpoint {tuple(tensor.shape)}, "
                             f"model expects {expected}")
        param.data[start:start + size].copy_(tensor)

    def extra_repr(self) -> str:
        q = self.quant
        kind = "dense" if q is None or self.quant_method is None else self.quant_method.describe(q)
        return f"in={self.in_features}, out={self.out_features}, {kind}, bias={self.bias is not None}"


def concat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack quantized weights along the output dimension (fused q/k/v or gate/up). Parts in different formats
    (a GGUF file may mix types within a fused projection) are first widened, losslessly, to the narrowest
    format that holds them all (:func:`~fastinfer.quantization.format.widen`)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    parts = common_format(parts)
    first = parts[0]
    mins = None if first.mins is None else torch.cat([p.mins for p in parts if p.mins is not None])
    return QuantizedWeight(first.bits, first.group_size, torch.cat([p.qweight for p in parts]),
                           torch.cat([p.scales for p in parts]), mins)
