"""A plain-PyTorch, differentiable forward of :class:`LlamaForCausalLM` over padded-free batches [B, T].

The serving forward runs through the paged KV cache and the ``fastinfer.ops`` kernels, which are neither
batched this way nor differentiable. Calibration by distillation (:mod:`fastinfer.quant_tune`) needs gradients
with respect to the weights, so this module recomputes the same function with fp32 torch ops (SDPA causal
attention) and takes each projection's weight from a callable, which may build it from trainable tensors.
It is tested against the paged forward (``tests/models/test_dense_forward.py``).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from fastinfer.layers.linear import Linear
from fastinfer.models.llama import LlamaDecoderLayer, LlamaForCausalLM

WeightFn = Callable[[Linear], torch.Tensor]


def stored_weight(layer: Linear) -> torch.Tensor:
    """The fp32 [out, in] weight a layer holds (dequantized when it is quantized)."""
    if layer.quant is not None:
        return layer.quant.dequantize()
    assert layer.weight is not None
    return layer.weight.float()


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2  # neox-style halves, as the serving rotary op
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _mask(t: int, window: int | None) -> torch.Tensor | None:
    if window is None or window >= t:
        return None
    i = torch.arange(t)
    return (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)  # [T, T] True = attend


def dense_logits(model: LlamaForCausalLM, ids: torch.Tensor, weight: WeightFn = stored_weight) -> torch.Tensor:
    """fp32 logits [B, T, vocab] of token ids [B, T] (every row starts at position 0)."""
    cfg = model.config
    b, t = ids.shape
    hd, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    cache = model.rotary.cos_sin_cache
    assert isinstance(cache, torch.Tensor)
    if t > cache.shape[0]:
        raise ValueError(f"{t} tokens exceed the model's {cache.shape[0]} positions")
    cs = cache[:t]  # [T, hd]
    cos, sin = cs[:, :hd // 2].view(1, t, 1, -1), cs[:, hd // 2:].view(1, t, 1, -1)
    mask = _mask(t, cfg.sliding_window)
    x = model.embed_tokens.weight.float()[ids]  # [B, T, d]
    for layer in model.layers:
        assert isinstance(layer, LlamaDecoderLayer)
        attn, mlp = layer.self_attn, layer.mlp
        h = _rms_norm(x, layer.input_layernorm.weight, cfg.rms_norm_eps)
        qkv = h @ weight(attn.qkv_proj).T  # [B, T, (nh + 2 nkv) hd]
        if attn.qkv_proj.bias is not None:
            qkv = qkv + attn.qkv_proj.bias.float()
        q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q = _rotate(q.view(b, t, nh, hd), cos, sin).transpose(1, 2)  # [B, nh, T, hd]
        k = _rotate(k.view(b, t, nkv, hd), cos, sin).transpose(1, 2)  # [B, nkv, T, hd]
        v = v.view(b, t, nkv, hd).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        x = x + o.transpose(1, 2).reshape(b, t, nh * hd) @ weight(attn.o_proj).T
        h = _rms_norm(x, layer.post_attention_layernorm.weight, cfg.rms_norm_eps)
        gate, up = (h @ weight(mlp.gate_up_proj).T).chunk(2, dim=-1)
        x = x + (F.silu(gate) * up) @ weight(mlp.down_proj).T
    x = _rms_norm(x, model.norm.weight, cfg.rms_norm_eps)
    head = model.embed_tokens.weight.float() if model.lm_head is None else weight(model.lm_head)
    return x @ head.T  # [B, T, vocab]
