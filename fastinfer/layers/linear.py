"""Linear layers, dense or weight-only quantized. Parameters are allocated uninitialised: weights always come
from a checkpoint (or from quantizing the loaded float weight)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastinfer.distributed.communication import all_reduce
from fastinfer.distributed.parallel_state import tp_rank, tp_size
from fastinfer.distributed.sharding import materialize, narrow
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
    ``state_dict`` saves them).

    Tensor parallelism (``parallel``): ``"column"`` holds this rank's output rows of each shard (``in_features``
    / ``out_features`` / ``shard_sizes`` are the local sizes; ``tp_shards[i]`` = (first row of this rank's slice,
    rows of the whole shard) in the checkpoint, default an even split); ``"row"`` holds this rank's input
    columns (``tp_shards`` = ((first column, all columns),)) and sums the ranks' outputs with one all-reduce;
    its bias lives on rank 0 only (zeros elsewhere), so it is added once; ``reduce=False`` leaves the sum to the
    caller (an MoE block reduces its shared expert together with its experts). Checkpoint tensors are narrowed to
    the slice as they load (quantized ones on group boundaries)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, shard_sizes: tuple[int, ...] | None = None,
                 ops: OpSet | None = None, parallel: str | None = None,
                 tp_shards: tuple[tuple[int, int], ...] | None = None, reduce: bool = True) -> None:
        super().__init__()
        if parallel not in (None, "column", "row"):
            raise ValueError(f"parallel must be None, 'column' or 'row', got {parallel!r}")
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
        self.parallel, self.reduce = parallel, reduce
        self.tp_rank, self.tp_size = (tp_rank(), tp_size()) if parallel else (0, 1)
        r, n = self.tp_rank, self.tp_size
        default = ((r * in_features, in_features * n),) if parallel == "row" else tuple(
            (r * s, s * n) for s in self.shard_sizes)
        self.tp_shards = tp_shards or default

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is None:
            assert self.weight is not None
            y = F.linear(x, self.weight, self.bias)
        else:
            assert self.quant_method is not None
            y = self.quant_method.apply(self, x)
        return all_reduce(y) if self.parallel == "row" and self.reduce and self.tp_size > 1 else y

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
        shards are collected and concatenated (rows) once every shard has arrived. Under tensor parallelism the
        tensor is the checkpoint's whole shard, narrowed here to this rank's slice."""
        if self.tp_size > 1:
            tensor = self._rank_slice(name, shard, tensor)
        tensor = materialize(tensor)
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

    def load_whole(self, name: str, tensor: Any) -> None:
        """Load a checkpoint tensor holding every shard (a fused ``qkv_proj`` / ``gate_up_proj``, or a plain
        projection), split by the checkpoint's shard sizes and narrowed to this rank's slices."""
        if self.parallel != "column":
            self.load_shard(name, 0, tensor)
            return
        start = 0
        for i, (_, full) in enumerate(self.tp_shards):
            self.load_shard(name, i, narrow(tensor, 0, start, full))
            start += full

    def _rank_slice(self, name: str, shard: int, tensor: Any) -> Any:
        offset, full = self.tp_shards[shard]
        if self.parallel == "column":
            dim, size = 0, self.shard_sizes[shard]
        elif name == "bias":  # row-parallel: the whole bias, on rank 0 only
            return tensor if self.tp_rank == 0 else torch.zeros(tuple(tensor.shape), dtype=torch.float32)
        else:
            dim, size = 1, self.in_features
        if tensor.shape[dim] != full:
            raise ValueError(f"shape mismatch for {name} shard {shard}: checkpoint {tuple(tensor.shape)}, the "
                             f"{self.parallel}-parallel layer expects {full} along dim {dim}")
        return narrow(tensor, dim, offset, size)

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
