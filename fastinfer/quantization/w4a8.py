"""``quantization="w4a8"`` / ``"w4a8-gN"``: int4 weights (round-to-nearest per group of N inputs, 128 by default,
as ``int4``; a GGUF file's own int4 tensors -- Q4_0 / Q4_1 / Q4_K -- are kept as they are) run with the activations
quantized to int8 per block of 32 inputs and integer dot products: llama.cpp's Q4 x Q8 scheme
(``ops.quant_linear_a8``). Int8 weights (the int8 lm_head, a file's Q8_0 / Q6_K tensors) take int8 activations too
(W8A8, Q8 x Q8). Faster where float dequantization is the bottleneck (AVX2 CPUs without a native bf16 dot); it
changes the numerics (the activation rounding), so it is its own method: ``int4`` / ``gguf`` stay exact fp32
arithmetic over the weights."""
from __future__ import annotations

from typing import TYPE_CHECKING

from fastinfer.quantization.int4 import INT4_GROUP_SIZES, Int4

if TYPE_CHECKING:
    import torch

    from fastinfer.layers.linear import Linear
    from fastinfer.quantization.format import QuantizedWeight


class W4A8(Int4):
    name = "w4a8"
    spellings = ("w4a8 (int4 group 128, int8 activations)",) + tuple(f"w4a8-g{g}" for g in INT4_GROUP_SIZES)
    supports_calibration = False

    def adopts(self, qw: QuantizedWeight) -> bool:
        """int4 weights in groups of 32k and int8 ones in groups of 16k (Q8_0, Q6_K, per channel), K a multiple
        of 32 (the activation block)."""
        return qw.shape[1] % 32 == 0 and qw.group_size % (32 if qw.bits == 4 else 16) == 0

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        q = layer.quant
        assert q is not None and layer.ops is not None, "a quantized Linear needs its weight and an OpSet"
        if not self.adopts(q):
            return super().apply(layer, x)
        return layer.ops.quant_linear_a8(x, q.qweight, q.scales, q.mins, q.group_size, layer.bias)

    def describe(self, qw: QuantizedWeight) -> str:
        return f"int{qw.bits} g{qw.group_size}{' a8' if self.adopts(qw) else ''}"  # a8: int8 activations
