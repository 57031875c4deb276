"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM, Phi-3): GQA, RoPE, RMSNorm, SwiGLU, tied embeddings.

q/k/v and gate/up projections are fused into one matmul each (Phi-3 checkpoints store them fused already);
attention reads and writes the paged KV cache through the op set. Qwen3 (:mod:`fastinfer.models.qwen3`) is this
class with per-head q/k norms.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from fastinfer.config import ModelConfig
from fastinfer.layers.attention import SelfAttention
from fastinfer.layers.mlp import GatedMLP
from fastinfer.layers.norm import RMSNorm
from fastinfer.layers.rotary import RotaryEmbedding, rotary_from_config
from fastinfer.models.base import DecoderForCausalLM, PreNormDecoderLayer, layer_sliding_window
from fastinfer.models.interface import ResidualBlock, RotationPlan, ValueHeads
from fastinfer.ops import AttentionMetadata, OpSet


class LlamaDecoderLayer(PreNormDecoderLayer):
    self_attn: SelfAttention
    mlp: GatedMLP
    input_layernorm: RMSNorm
    post_attention_layernorm: RMSNorm

    def __init__(self, cfg: ModelConfig, ops: OpSet, dtype: torch.dtype, rotary: RotaryEmbedding, index: int,
                 qk_norm: bool = False, o_bias: bool = False) -> None:
        super().__init__()
        self.self_attn = SelfAttention(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                                       cfg.head_dim, ops, dtype, rotary, qkv_bias=cfg.attention_bias,
                                       o_bias=o_bias, qk_norm_eps=cfg.rms_norm_eps if qk_norm else None,
                                       sliding_window=layer_sliding_window(cfg, index))
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, ops, dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops, dtype)


class LlamaForCausalLM(DecoderForCausalLM):
    """The model interface (:class:`fastinfer.models.interface.CausalLM`) for the Llama family: ``forward``
    maps packed token ids [T] and positions [T] to hidden states [T, hidden]; ``compute_logits`` maps selected
    hidden states to fp32 logits [S, vocab]. ``QK_NORM`` adds RMSNorm over each head's q and k, and
    ``O_PROJ_BIAS`` gives the output projection a bias when the config has ``attention_bias`` (Qwen3)."""

    STACKED = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }
    QK_NORM: ClassVar[bool] = False
    O_PROJ_BIAS: ClassVar[bool] = False
    SUPPORTS_TP = True

    def __init__(self, cfg: ModelConfig, ops: OpSet, dtype: torch.dtype) -> None:
        super().__init__(cfg, ops, dtype)
        self.rotary = rotary_from_config(cfg, ops)
        o_bias = self.O_PROJ_BIAS and cfg.attention_bias
        self.layers = nn.ModuleList(self.make_layer(cfg, ops, dtype, i, o_bias) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops, dtype)
        self.lm_head = self.new_lm_head()

    def make_layer(self, cfg: ModelConfig, ops: OpSet, dtype: torch.dtype, index: int, o_bias: bool) -> nn.Module:
        """Decoder layer ``index`` (subclasses with another MLP, e.g. the MoE families, override this)."""
        return LlamaDecoderLayer(cfg, ops, dtype, self.rotary, index, bool(self.QK_NORM), o_bias)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, hidden]
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x

    def rotation_plan(self) -> RotationPlan:
        blocks: list[ResidualBlock] = []
        c = self.config
        for layer in self.layers:
            assert isinstance(layer, LlamaDecoderLayer)
            attn, mlp = layer.self_attn, layer.mlp
            values = ValueHeads(attn.qkv_proj, (c.num_attention_heads + c.num_key_value_heads) * c.head_dim,
                                c.num_key_value_heads, attn.o_proj, c.num_attention_heads, c.head_dim)
            blocks.append(ResidualBlock(layer.input_layernorm.weight, (attn.qkv_proj,), (attn.o_proj,), values))
            blocks.append(ResidualBlock(layer.post_attention_layernorm.weight, (mlp.gate_up_proj,), (mlp.down_proj,)))
        return RotationPlan(self.embed_tokens.weight, tuple(blocks), self.norm.weight, self._untied_lm_head)
