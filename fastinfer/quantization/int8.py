"""``quantization="int8"``: W8A16, symmetric round-to-nearest per output channel (per group when a group size
is given); the lm_head's default too."""
from __future__ import annotations

from typing import TYPE_CHECKING

from fastinfer.quantization.methods import QuantMethod

if TYPE_CHECKING:
    import torch

    from fastinfer.quantization.format import QuantizedWeight


class Int8(QuantMethod):
    name = "int8"
    bits = 8
    supports_calibration = True

    def group_size(self, in_features: int, requested: int | None = None) -> int:
        return requested or in_features

    def quantize_weight(self, w: torch.Tensor, group_size: int | None = None) -> QuantizedWeight:
        from fastinfer.quantization.rtn import quantize_int8

        return quantize_int8(w, group_size)
