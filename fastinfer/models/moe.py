"""Sparse Mixture-of-Experts decoders: Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE. Each is the Llama layout
(fused q/k/v, RoPE, RMSNorm pre-norm blocks) with :class:`fastinfer.layers.moe.SparseMoeBlock` in place of the
MLP, routed through the op set's ``fused_moe``; the families differ in class attributes only:

- Mixtral: top-k weights always renormalised; checkpoint ``block_sparse_moe.`` is our ``mlp.``; experts w1/w3/w2;
- Qwen2-MoE: q/k/v bias (``qkv_bias``), ``norm_topk_prob``, a shared expert behind a sigmoid gate, dense MLP layers
  where ``mlp_only_layers`` / ``decoder_sparse_step`` say, experts of ``moe_intermediate_size``;
- Qwen3-MoE: Qwen2-MoE without the shared expert and q/k/v bias, with per-head q/k RMSNorm (Qwen3's);
- OLMoE: RMSNorm over the whole q and k projections (not per head) and the optional ``clip_qkv``.

Weight quantization (``quantize``) covers the dense projections and the experts (int8 / int4 weight-only, read by
``fused_moe`` as they are); routers and the shared-expert gate stay float. ``moe_layers`` lists the MoE blocks.
"""
from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
from torch import nn

from fastinfer.config import ModelConfig
from fastinfer.layers.attention import SelfAttention
from fastinfer.layers.mlp import GatedMLP
from fastinfer.layers.moe import FusedExperts, SparseMoeBlock, expert_checkpoint_name
from fastinfer.layers.norm import RMSNorm
from fastinfer.layers.rotary import RotaryEmbedding
from fastinfer.models.base import PreNormDecoderLayer, layer_sliding_window
from fastinfer.models.interface import RotationPlan
from fastinfer.models.llama import LlamaForCausalLM
from fastinfer.ops import OpSet
from fastinfer.quantization.methods import resolve_method

logger = logging.getLogger("fastinfer.models")


class MoEDecoderLayer(PreNormDecoderLayer):
    def __init__(self, model: type[MoEForCausalLM], cfg: ModelConfig, ops: OpSet, dtype: torch.dtype,
                 rotary: RotaryEmbedding, index: int, o_bias: bool) -> None:
        super().__init__()
        hf = cfg.hf_config
        self.self_attn = SelfAttention(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, ops, dtype, rotary,
            qkv_bias=model.qkv_bias(cfg), o_bias=o_bias, qk_norm_eps=cfg.rms_norm_eps if model.QK_NORM else None,
            qk_norm_whole=model.QK_NORM == "whole", clip_qkv=hf.get("clip_qkv"),
            sliding_window=layer_sliding_window(cfg, index))
        if model.is_sparse(cfg, index):
            shared = hf.get("shared_expert_intermediate_size") if model.SHARED_EXPERT else None
            self.mlp = SparseMoeBlock(cfg.hidden_size, model.expert_size(cfg), model.num_experts(cfg),
                                      int(hf["num_experts_per_tok"]), model.renormalize(cfg), ops, dtype, shared)
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, ops, dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops, dtype)


class MoEForCausalLM(LlamaForCausalLM):
    """The shared MoE decoder (see the module docstring): the Llama model with :class:`MoEDecoderLayer`s;
    subclasses set the class attributes and override the config readers."""

    QK_NORM: ClassVar[bool | str] = False  # type: ignore[assignment]  # True: per head (Qwen3); "whole": OLMoE
    SHARED_EXPERT: ClassVar[bool] = False
    SUPPORTS_TP = True  # experts split by intermediate size (layers/moe.py)

    def make_layer(self, cfg: ModelConfig, ops: OpSet, dtype: torch.dtype, index: int, o_bias: bool) -> nn.Module:
        return MoEDecoderLayer(type(self), cfg, ops, dtype, self.rotary, index, o_bias)

    # -- what the families differ in (HF config keys) --------------------------------------------------------------

    @classmethod
    def qkv_bias(cls, cfg: ModelConfig) -> bool:
        return cfg.attention_bias

    @classmethod
    def num_experts(cls, cfg: ModelConfig) -> int:
        n = cfg.hf_config.get("num_local_experts") or cfg.hf_config.get("num_experts")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"{cfg.architecture}: the config needs num_experts / num_local_experts >= 1, got {n!r}")
        return n

    @classmethod
    def expert_size(cls, cfg: ModelConfig) -> int:
        return int(cfg.hf_config.get("moe_intermediate_size") or cfg.intermediate_size)

    @classmethod
    def renormalize(cls, cfg: ModelConfig) -> bool:
        return bool(cfg.hf_config.get("norm_topk_prob", False))

    @classmethod
    def is_sparse(cls, cfg: ModelConfig, index: int) -> bool:
        """HF's rule: not in ``mlp_only_layers`` and every ``decoder_sparse_step``-th layer (default: all)."""
        hf = cfg.hf_config
        step = int(hf.get("decoder_sparse_step") or 1)
        return index not in (hf.get("mlp_only_layers") or []) and (index + 1) % step == 0

    # -- the model ---------------------------------------------------------------------------------------------------

    def rotation_plan(self) -> RotationPlan:
        raise ValueError(f"{self.config.architecture}: Hadamard rotation of MoE models is not supported")

    def load_custom(self, name: str, tensor: Any) -> list[str] | None:
        """Expert tensors, per expert or stacked, into their layer's w13 / w2."""
        parsed = expert_checkpoint_name(name)
        if parsed is None:
            return None
        module_name, param, expert, half = parsed
        experts = self.get_submodule(module_name)
        if not isinstance(experts, FusedExperts):
            raise ValueError(f"checkpoint tensor {name!r} has no place in {self.config.architecture}")
        return [f"{module_name}.{param}.weight"] if experts.load(param, expert, half, tensor) else []

    def quantize(self, method: str, group_size: int | None = None, lm_head: str | None = "int8") -> None:
        """The dense projections as every model's, then each MoE layer's experts with the same method (its
        ``quantize_experts``: per expert, stacked); the routers and the shared-expert gate stay float."""
        super().quantize(method, group_size, lm_head)
        qm, group = resolve_method(method, group_size)
        blocks = [b for b in self.moe_layers() if isinstance(b, SparseMoeBlock)]
        done = sum(b.experts.quantize(qm, group) for b in blocks)
        logger.info("%s: %s experts of %d of %d MoE layers", self.config.architecture,
                    f"quantized ({method})" if done else f"left float ({method} creates no weights)", done,
                    len(blocks))


class MixtralForCausalLM(MoEForCausalLM):
    RENAMES = ((r"\.block_sparse_moe\.", ".mlp."),)

    @classmethod
    def renormalize(cls, cfg: ModelConfig) -> bool:
        return True


class Qwen2MoeForCausalLM(MoEForCausalLM):
    RENAMES = ((r"\.shared_expert_gate\.weight$", ".shared_expert_gate"),)  # ours is a bare [1, H] parameter
    SHARED_EXPERT = True

    @classmethod
    def qkv_bias(cls, cfg: ModelConfig) -> bool:
        return bool(cfg.hf_config.get("qkv_bias", True))


class Qwen3MoeForCausalLM(MoEForCausalLM):
    QK_NORM = True
    O_PROJ_BIAS = True  # o_proj bias when attention_bias, as Qwen3


class OlmoeForCausalLM(MoEForCausalLM):
    QK_NORM = "whole"
    O_PROJ_BIAS = True
