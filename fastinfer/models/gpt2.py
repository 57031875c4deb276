"""GPT-2: learned absolute position embeddings, pre-LayerNorm blocks with biases everywhere, a two-layer GELU MLP
(``activation_function``, ``gelu_new`` by default), multi-head attention without RoPE, tied lm_head.

The checkpoint's ``Conv1D`` weights are stored [in, out]; loading transposes them into :class:`Linear`'s
[out, in]. The fused ``c_attn`` rows are [q; k; v], our ``qkv_proj`` shards as they are.
"""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from fastinfer.config import ModelConfig
from fastinfer.layers.attention import SelfAttention
from fastinfer.layers.embedding import embedding
from fastinfer.layers.mlp import MLP
from fastinfer.layers.norm import LayerNorm
from fastinfer.models.base import DecoderForCausalLM, PreNormDecoderLayer
from fastinfer.ops import AttentionMetadata, OpSet
from fastinfer.quantization.format import QuantizedWeight

_CONV1D_WEIGHT = re.compile(r"\.(c_attn|c_proj|c_fc)\.weight$")


class GPT2Block(PreNormDecoderLayer):
    def __init__(self, cfg: ModelConfig, ops: OpSet, dtype: torch.dtype, index: int) -> None:
        super().__init__()
        hf, h = cfg.hf_config, cfg.hidden_size
        scale = cfg.head_dim ** -0.5 if hf.get("scale_attn_weights", True) else 1.0
        if hf.get("scale_attn_by_inverse_layer_idx", False):
            scale /= index + 1
        self.input_layernorm = LayerNorm(h, cfg.rms_norm_eps, dtype)
        self.self_attn = SelfAttention(h, cfg.num_attention_heads, cfg.num_attention_heads, cfg.head_dim, ops, dtype,
                                       None, qkv_bias=True, o_bias=True, scale=scale)
        self.post_attention_layernorm = LayerNorm(h, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(h, cfg.intermediate_size, hf.get("activation_function", "gelu_new"), ops, dtype)


class GPT2LMHeadModel(DecoderForCausalLM):
    PREFIXES = ("transformer.",)
    IGNORED = (r"\.attn\.(masked_)?bias$",)  # the causal-mask buffers older checkpoints store
    RENAMES = (
        (r"^wte\.", "embed_tokens."), (r"^wpe\.", "embed_positions."), (r"^ln_f\.", "norm."),
        (r"^h\.(\d+)\.", r"layers.\1."),
        (r"\.ln_1\.", ".input_layernorm."), (r"\.ln_2\.", ".post_attention_layernorm."),
        (r"\.attn\.c_attn\.", ".self_attn.qkv_proj."), (r"\.attn\.c_proj\.", ".self_attn.o_proj."),
        (r"\.mlp\.c_fc\.", ".mlp.fc_in."), (r"\.mlp\.c_proj\.", ".mlp.fc_out."),
    )

    def __init__(self, cfg: ModelConfig, ops: OpSet, dtype: torch.dtype) -> None:
        super().__init__(cfg, ops, dtype)
        self.embed_positions = embedding(cfg.max_position_embeddings, cfg.hidden_size, dtype)
        self.layers = nn.ModuleList(GPT2Block(cfg, ops, dtype, i) for i in range(cfg.num_hidden_layers))
        self.norm = LayerNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = self.new_lm_head()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids) + self.embed_positions(positions)  # [T, hidden]
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x

    def convert_tensor(self, hf_name: str, tensor: Any) -> Any:
        if not _CONV1D_WEIGHT.search(hf_name):
            return tensor
        if isinstance(tensor, QuantizedWeight):
            raise ValueError(f"{hf_name}: a quantized Conv1D weight cannot be transposed")
        return tensor.t()  # Conv1D [in, out] -> Linear [out, in]
