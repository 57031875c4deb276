"""Qwen3: the Llama layout with RMSNorm over each head's q and k before RoPE, an explicit ``head_dim``, an
output-projection bias when ``attention_bias`` and per-layer sliding windows (``layer_types``)."""
from __future__ import annotations

from fastinfer.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    QK_NORM = True
    O_PROJ_BIAS = True
