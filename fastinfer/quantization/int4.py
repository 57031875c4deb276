"""``quantization="int4"`` / ``"int4-gN"``: W4A16, asymmetric round-to-nearest per group of N inputs (128 by
default; a smaller group where N does not divide the layer's input size, e.g. 64 for SmolLM2's 576)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from fastinfer.quantization.methods import QuantMethod, QuantSpec

if TYPE_CHECKING:
    import torch

    from fastinfer.quantization.format import QuantizedWeight

INT4_GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 128


class Int4(QuantMethod):
    name = "int4"
    spellings = ("int4 (group 128)",) + tuple(f"int4-g{g}" for g in INT4_GROUP_SIZES)
    bits = 4
    supports_calibration = True

    def parse(self, spec: str) -> QuantSpec | None:
        """``NAME`` (group 128) or ``NAME-gN`` for N in INT4_GROUP_SIZES; NAME is this method's (subclasses of
        int4 weights, such as ``w4a8``, parse the same way)."""
        if spec == self.name:
            return QuantSpec(self.name, DEFAULT_GROUP_SIZE)
        g = spec.removeprefix(f"{self.name}-g")
        if g != spec and g.isdigit() and int(g) in INT4_GROUP_SIZES:
            return QuantSpec(self.name, int(g))
        return None

    def group_size(self, in_features: int, requested: int | None = None) -> int:
        from fastinfer.quantization.rtn import fit_group_size

        return fit_group_size(in_features, requested or DEFAULT_GROUP_SIZE)

    def quantize_weight(self, w: torch.Tensor, group_size: int | None = None) -> QuantizedWeight:
        from fastinfer.quantization.rtn import quantize_int4

        return quantize_int4(w, self.group_size(w.shape[1], group_size))
