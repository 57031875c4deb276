"""Self-attention over the paged KV cache: the fused q/k/v projection, optional per-head q/k RMSNorm, RoPE, the
op set's ``store_kv`` + ``paged_attention`` and the output projection. Every native family builds its attention
from this module (the model's ``bind_kv_cache`` hands each one its (k, v) cache pair)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fastinfer.distributed.parallel_state import tp_rank, tp_size
from fastinfer.distributed.sharding import head_shard
from fastinfer.layers.kv_rotation import key_rotation, rotate
from fastinfer.layers.linear import Linear
from fastinfer.layers.norm import RMSNorm
from fastinfer.layers.rotary import RotaryEmbedding
from fastinfer.ops import AttentionMetadata, OpSet


class SelfAttention(nn.Module):
    """``o_proj(attention(rope(q), rope(k), v))`` for packed tokens [T, hidden]. ``qkv_proj`` is one
    :class:`Linear` with shards (q, k, v); ``rotary`` None means no RoPE (learned absolute positions);
    ``qk_norm_eps`` adds RMSNorm over each head's q and k before RoPE (Qwen3; ``qk_norm_cls`` another norm of
    RMSNorm's signature, e.g. Gemma 3's), or with ``qk_norm_whole`` over the whole q and k projections (OLMoE);
    ``clip_qkv`` clamps q, k and v to [-clip_qkv, clip_qkv] after the norms (OLMoE's option); ``scale``
    defaults to head_dim ** -0.5; ``softcap`` caps the scores to
    ``softcap * tanh(score / softcap)`` (Gemma 2). Under tensor parallelism (``tp_size() > 1``) the layer holds
    this rank's heads (:func:`~fastinfer.distributed.sharding.head_shard`): ``num_heads`` / ``num_kv_heads``
    become the local counts, q/k/v are column-parallel and ``o_proj`` row-parallel (one all-reduce)."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, ops: OpSet,
                 dtype: torch.dtype, rotary: RotaryEmbedding | None, *, qkv_bias: bool = False,
                 o_bias: bool = False, qk_norm_eps: float | None = None, sliding_window: int | None = None,
                 scale: float | None = None, softcap: float | None = None,
                 qk_norm_cls: Callable[..., nn.Module] = RMSNorm, qk_norm_whole: bool = False,
                 clip_qkv: float | None = None) -> None:
        super().__init__()
        self.ops = ops
        tp = tp_size()
        if tp > 1 and qk_norm_whole:
            raise ValueError("tensor parallelism is not supported with a q/k norm over the whole projection (OLMoE)")
        hs = head_shard(num_heads, num_kv_heads, tp_rank(), tp)  # this rank's heads (all of them without TP)
        self.num_heads, self.num_kv_heads, self.head_dim = hs.num_heads, hs.num_kv_heads, head_dim
        q_size, kv_size = hs.num_heads * head_dim, hs.num_kv_heads * head_dim
        q_shard, kv_shard = (hs.q_start * head_dim, num_heads * head_dim), (hs.kv_start * head_dim,
                                                                            num_kv_heads * head_dim)
        self.qkv_proj = Linear(hidden_size, q_size + 2 * kv_size, bias=qkv_bias, dtype=dtype,
                               shard_sizes=(q_size, kv_size, kv_size), ops=ops,
                               parallel="column" if tp > 1 else None, tp_shards=(q_shard, kv_shard, kv_shard))
        self.o_proj = Linear(q_size, hidden_size, bias=o_bias, dtype=dtype, ops=ops,
                             parallel="row" if tp > 1 else None, tp_shards=(q_shard,))
        self.q_norm = self.k_norm = None
        self.qk_norm_whole, self.clip_qkv = qk_norm_whole, clip_qkv
        if qk_norm_eps is not None:
            self.q_norm = qk_norm_cls(q_size if qk_norm_whole else head_dim, qk_norm_eps, ops, dtype)
            self.k_norm = qk_norm_cls(kv_size if qk_norm_whole else head_dim, qk_norm_eps, ops, dtype)
        self.rotary = rotary  # shared by all layers
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.sliding_window = sliding_window
        self.softcap = softcap
        self.act_dtype = dtype
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        self.key_rotation: torch.Tensor | None = None  # set by bind_cache for a quantized cache

    def bind_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        """Attach this layer's (k, v) paged cache; a quantized one also gets the q/k rotation
        (:mod:`fastinfer.layers.kv_rotation`)."""
        self.k_cache, self.v_cache = k_cache, v_cache
        self.key_rotation = key_rotation(k_cache, self.head_dim, self.act_dtype)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.shard_sizes, dim=-1)
        if self.qk_norm_whole and self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(t, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.view(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if not self.qk_norm_whole and self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)
        if self.rotary is not None:
            q, k = self.rotary(positions, q, k)
        q, k = rotate(q, self.key_rotation), rotate(k, self.key_rotation)
        meta = meta.for_window(self.sliding_window)  # this layer's KV cache group: its block table and slots
        self.ops.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        o = self.ops.paged_attention(q, self.k_cache, self.v_cache, meta, self.scale, self.sliding_window,
                                     self.softcap)
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim))
