"""Gemma 2 and Gemma 3 (text, ``Gemma3ForCausalLM``): embeddings scaled by sqrt(hidden) in the model dtype, (1 + w)
RMSNorm in fp32, a norm before and after both attention and the GeGLU MLP, sliding-window and global layers
interleaved (each kind with its own RoPE in Gemma 3), attention scale ``query_pre_attn_scalar ** -0.5``, final
logit soft-capping; Gemma 2 also soft-caps the attention logits, Gemma 3 normalises each head's q and k instead
(it ignores ``attn_logit_softcapping``, as transformers does).

What the HF config gives (keys as in ``config.json``; a GGUF mapping must fill the same ones in ``hf_config``):

- layer kinds: ``layer_types`` ("sliding_attention" / "full_attention" per layer), else every
  ``sliding_window_pattern``-th layer global (Gemma 2: every 2nd; Gemma 3: default 6), window ``sliding_window``;
- RoPE: ``rope_parameters`` nested per layer kind (transformers >= 5, Gemma 3), flat (Gemma 2), or the older keys
  ``rope_theta`` + ``rope_scaling`` (global layers) and ``rope_local_base_freq`` (Gemma 3's sliding layers);
- ``query_pre_attn_scalar``, ``attn_logit_softcapping`` (Gemma 2), ``final_logit_softcapping``,
  ``hidden_activation`` (default ``gelu_pytorch_tanh``).
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from fastinfer.config import ModelConfig
from fastinfer.layers.attention import SelfAttention
from fastinfer.layers.mlp import GatedMLP
from fastinfer.layers.norm import GemmaRMSNorm
from fastinfer.layers.rotary import RotaryEmbedding
from fastinfer.models.base import DecoderForCausalLM, input_norm
from fastinfer.ops import AttentionMetadata, OpSet

SLIDING, FULL = "sliding_attention", "full_attention"


class GemmaDecoderLayer(nn.Module):
    """``x += post_attn_norm(attn(input_norm(x)))``, then ``x += post_ff_norm(mlp(pre_ff_norm(x)))``; the residual
    adds are fused into the next norm (as in Llama), which gives the same sums."""

    def __init__(self, cfg: ModelConfig, ops: OpSet, dtype: torch.dtype, rotary: RotaryEmbedding,
                 sliding_window: int | None, attn_softcap: float | None, qk_norm: bool) -> None:
        super().__init__()
        hf, eps, hidden = cfg.hf_config, cfg.rms_norm_eps, cfg.hidden_size
        self.self_attn = SelfAttention(
            hidden, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, ops, dtype, rotary,
            qkv_bias=cfg.attention_bias, o_bias=cfg.attention_bias, qk_norm_eps=eps if qk_norm else None,
            qk_norm_cls=GemmaRMSNorm, sliding_window=sliding_window, softcap=attn_softcap,
            scale=float(hf.get("query_pre_attn_scalar") or cfg.head_dim) ** -0.5)
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        self.mlp = GatedMLP(hidden, cfg.intermediate_size, ops, dtype, activation=act)
        self.input_layernorm = GemmaRMSNorm(hidden, eps, ops, dtype)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps, ops, dtype)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps, ops, dtype)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps, ops, dtype)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = input_norm(self.input_layernorm, x, residual)
        h = self.post_attention_layernorm(self.self_attn(positions, h, meta))
        h, residual = self.pre_feedforward_layernorm(h, residual)
        return self.post_feedforward_layernorm(self.mlp(h)), residual


class Gemma2ForCausalLM(DecoderForCausalLM):
    """The model interface for Gemma 2 (and, with the class attributes below, Gemma 3): see the module docstring."""

    STACKED = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }
    QK_NORM: ClassVar[bool] = False  # Gemma 3: per-head q/k norms
    ATTN_SOFTCAP: ClassVar[bool] = True  # Gemma 2: attention logit soft-capping
    LOCAL_ROPE_KEY: ClassVar[str | None] = None  # the legacy key of the sliding layers' RoPE base (Gemma 3)
    GLOBAL_EVERY: ClassVar[int] = 2  # without layer_types: every n-th layer is global (sliding_window_pattern)
    GLOBAL_THETA: ClassVar[float] = 10000.0  # the global layers' RoPE base when the config names none

    def __init__(self, cfg: ModelConfig, ops: OpSet, dtype: torch.dtype) -> None:
        super().__init__(cfg, ops, dtype)
        hf = cfg.hf_config
        if hf.get("use_bidirectional_attention"):
            raise ValueError(f"{cfg.architecture} with use_bidirectional_attention is an encoder; fastinfer serves "
                             "causal decoders only")
        self.register_buffer("embed_scale", torch.tensor(cfg.hidden_size ** 0.5, dtype=dtype), persistent=False)
        types = layer_types(hf, cfg.num_hidden_layers, self.GLOBAL_EVERY)
        rotary = {kind: RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings,
                                        *rope_params(hf, kind, self.LOCAL_ROPE_KEY, self.GLOBAL_THETA), ops)
                  for kind in sorted(set(types))}
        self.rotary = nn.ModuleDict(rotary)  # shared by the layers of each kind
        attn_cap = hf.get("attn_logit_softcapping") if self.ATTN_SOFTCAP else None
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(cfg, ops, dtype, rotary[kind], cfg.sliding_window if kind == SLIDING else None,
                              attn_cap, self.QK_NORM) for kind in types)
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops, dtype)
        self.final_softcap: float | None = hf.get("final_logit_softcapping")
        self.lm_head = self.new_lm_head()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids) * self.embed_scale  # [T, hidden], scaled in the model dtype as HF does
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)  # [S, vocab] fp32
        cap = self.final_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Gemma 3 text: q/k norms, no attention soft-capping, RoPE per layer kind (``rope_local_base_freq`` for the
    sliding layers), every 6th layer global by default."""

    QK_NORM = True
    ATTN_SOFTCAP = False
    LOCAL_ROPE_KEY = "rope_local_base_freq"
    GLOBAL_EVERY = 6
    GLOBAL_THETA = 1_000_000.0


def layer_types(hf: dict[str, Any], num_layers: int, global_every: int) -> list[str]:
    """Each layer's kind, :data:`SLIDING` or :data:`FULL`, from ``layer_types`` or ``sliding_window_pattern``."""
    types = hf.get("layer_types")
    if types is None:
        every = hf.get("sliding_window_pattern")
        every = global_every if every is None else every
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"sliding_window_pattern must be a positive integer, got {every!r}")
        types = [SLIDING if (i + 1) % every else FULL for i in range(num_layers)]
    if not isinstance(types, list) or len(types) != num_layers or not set(types) <= {SLIDING, FULL}:
        raise ValueError(f"layer_types must list {num_layers} entries of {SLIDING!r} / {FULL!r}, got {types!r}")
    if SLIDING in types and not hf.get("sliding_window"):
        raise ValueError(f"layer_types has {SLIDING!r} layers but sliding_window is {hf.get('sliding_window')!r}")
    return types


def rope_params(hf: dict[str, Any], kind: str, local_key: str | None, global_theta: float,
                ) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling dict or None) of the layers of ``kind``: sliding layers default to base 10000, global
    ones to ``global_theta``."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and kind in params:  # nested per layer kind
        p = dict(params[kind] or {})
    elif kind == SLIDING and local_key is not None:  # legacy Gemma 3: local base, never scaled
        p = {"rope_theta": hf.get(local_key, 10000.0)}
    elif isinstance(params, dict):  # flat
        p = dict(params)
    else:
        p = {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta")}
    theta = p.get("rope_theta") or (10000.0 if kind == SLIDING else global_theta)
    kind_of_rope = p.get("rope_type", p.get("type", "default"))
    return float(theta), None if kind_of_rope in (None, "default") else p
