"""``quantization="gguf"``: keep a GGUF file's own Q8_0 / Q4_0 / Q4_1 tensors as they are (lossless: int8 /
int4 group 32 with the file's f16 scales, see :func:`fastinfer.models.gguf_loader.to_quantized`) and leave
its float tensors float. It creates no weights of its own."""
from __future__ import annotations

from fastinfer.quantization.methods import QuantMethod


class GGUF(QuantMethod):
    name = "gguf"
    quantize_at_load = False
