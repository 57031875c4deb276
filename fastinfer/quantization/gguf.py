"""``quantization="gguf"``: keep a GGUF file's own quantized tensors as they are, lossless (Q4_0 / Q4_1 / Q4_K
as int4 group 32, Q8_0 / Q5_0 / Q5_1 / Q5_K as int8 group 32, Q2_K / Q3_K / Q6_K as int8 group 16; see
:func:`fastinfer.models.gguf_quants.to_quantized`) and leave its float tensors float. It creates no weights of
its own."""
from __future__ import annotations

from fastinfer.quantization.methods import QuantMethod


class GGUF(QuantMethod):
    name = "gguf"
    quantize_at_load = False
