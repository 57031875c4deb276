"""GPT-NeoX / Pythia: LayerNorm, partial rotary (``partial_rotary_factor`` / ``rotary_pct`` of each head),
biases, a two-layer GELU MLP, untied ``embed_out`` and the parallel residual (``use_parallel_residual``:
``x + attn(ln1(x)) + mlp(ln2(x))``; otherwise the sequential pre-norm block).

The checkpoint's fused ``query_key_value`` rows are interleaved per head ([H, 3, D]: q, k, v of head 0, then of
head 1, ...); loading regroups them into our ``qkv_proj`` shards [q; k; v].
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fastinfer.config import ModelConfig
from fastinfer.layers.attention import SelfAttention
from fastinfer.layers.mlp import MLP
from fastinfer.layers.norm import LayerNorm
from fastinfer.layers.rotary import RotaryEmbedding, rotary_from_config
from fastinfer.models.base import DecoderForCausalLM
from fastinfer.ops import AttentionMetadata, OpSet
from fastinfer.quantization.format import QuantizedWeight


class GPTNeoXLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: OpSet, dtype: torch.dtype, rotary: RotaryEmbedding) -> None:
        super().__init__()
        hf, h = cfg.hf_config, cfg.hidden_size
        self.parallel = bool(hf.get("use_parallel_residual", True))
        self.input_layernorm = LayerNorm(h, cfg.rms_norm_eps, dtype)
        self.self_attn = SelfAttention(h, cfg.num_attention_heads, cfg.num_attention_heads, cfg.head_dim, ops, dtype,
                                       rotary, qkv_bias=cfg.attention_bias, o_bias=cfg.attention_bias)
        self.post_attention_layernorm = LayerNorm(h, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(h, cfg.intermediate_size, hf.get("hidden_act", "gelu"), ops, dtype)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        a = self.self_attn(positions, self.input_layernorm(x), meta)
        if self.parallel:
            return x + a + self.mlp(self.post_attention_layernorm(x))
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x))


class GPTNeoXForCausalLM(DecoderForCausalLM):
    PREFIXES = ("gpt_neox.",)
    IGNORED = (r"rotary_emb\.inv_freq$", r"\.attention\.(masked_)?bias$")  # buffers older checkpoints store
    RENAMES = (
        (r"^embed_in\.", "embed_tokens."), (r"^embed_out\.", "lm_head."), (r"^final_layer_norm\.", "norm."),
        (r"\.attention\.query_key_value\.", ".self_attn.qkv_proj."), (r"\.attention\.dense\.", ".self_attn.o_proj."),
        (r"\.mlp\.dense_h_to_4h\.", ".mlp.fc_in."), (r"\.mlp\.dense_4h_to_h\.", ".mlp.fc_out."),
    )

    def __init__(self, cfg: ModelConfig, ops: OpSet, dtype: torch.dtype) -> None:
        super().__init__(cfg, ops, dtype)
        self.rotary = rotary_from_config(cfg, ops)
        self.layers = nn.ModuleList(GPTNeoXLayer(cfg, ops, dtype, self.rotary) for _ in range(cfg.num_hidden_layers))
        self.norm = LayerNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = self.new_lm_head()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, hidden]
        for layer in self.layers:
            x = layer(positions, x, meta)
        return self.norm(x)

    def convert_tensor(self, hf_name: str, tensor: Any) -> Any:
        if ".attention.query_key_value." not in hf_name:
            return tensor
        if isinstance(tensor, QuantizedWeight):
            raise ValueError(f"{hf_name}: a quantized per-head interleaved q/k/v weight cannot be regrouped")
        c = self.config
        rows = tensor.view(c.num_attention_heads, 3, c.head_dim, *tensor.shape[1:])  # [H, 3, D, (in)]
        return rows.transpose(0, 1).reshape(tensor.shape)  # [3, H, D, (in)]: q rows, k rows, v rows
