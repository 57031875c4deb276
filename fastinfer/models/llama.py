"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM): GQA, RoPE, RMSNorm, SwiGLU, tied embeddings.

q/k/v and gate/up projections are fused into one matmul each; attention reads and writes the paged KV
cache through the op set.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from fastinfer.config import ModelConfig
from fastinfer.layers.linear import Linear
from fastinfer.layers.norm import RMSNorm
from fastinfer.layers.rotary import RotaryEmbedding
from fastinfer.models.interface import KVCaches, LayerKVSpec, ResidualBlock, RotationPlan, ValueHeads
from fastinfer.ops import AttentionMetadata, OpSet
from fastinfer.quantization.format import QuantizedWeight
from fastinfer.quantization.methods import QuantMethod, get_method, parse_method


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: OpSet, dtype: torch.dtype, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.ops = ops
        self.num_heads, self.num_kv_heads, self.head_dim = (cfg.num_attention_heads, cfg.num_key_value_heads,
                                                            cfg.head_dim)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.attention_bias, dtype=dtype,
                               shard_sizes=(q_size, kv_size, kv_size), ops=ops)
        self.o_proj = Linear(q_size, cfg.hidden_size, dtype=dtype, ops=ops)
        self.rotary = rotary  # shared by all layers
        self.scale = self.head_dim ** -0.5
        self.sliding_window = cfg.sliding_window
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.shard_sizes, dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.view(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(t, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        self.ops.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        o = self.ops.paged_attention(q, self.k_cache, self.v_cache, meta, self.scale, self.sliding_window)
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: OpSet, dtype: torch.dtype) -> None:
        super().__init__()
        self.ops = ops
        n = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * n, dtype=dtype, shard_sizes=(n, n), ops=ops)
        self.down_proj = Linear(n, cfg.hidden_size, dtype=dtype, ops=ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: OpSet, dtype: torch.dtype, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, ops, dtype, rotary)
        self.mlp = LlamaMLP(cfg, ops, dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops, dtype)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(positions, h, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    """The model interface (:class:`fastinfer.models.interface.CausalLM`) for the Llama family: ``forward``
    maps packed token ids [T] and positions [T] to hidden states [T, hidden]; ``compute_logits`` maps selected
    hidden states to fp32 logits [S, vocab]."""

    # checkpoint name fragment -> (our module name fragment, shard index)
    STACKED = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig, ops: OpSet, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = cfg
        max_position = cfg.max_position_embeddings
        self.kv_caches: KVCaches = []
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, _weight=torch.empty(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype))
        self.embed_tokens.weight.requires_grad_(False)
        self.rotary = RotaryEmbedding(cfg.head_dim, max_position, cfg.rope_theta, cfg.rope_scaling, ops)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, ops, dtype, self.rotary)
                                    for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops, dtype)
        self.ops, self.dtype = ops, dtype
        # Tied models have no lm_head until quantization gives them a quantized copy of the embedding.
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, dtype=dtype,
                                                                   ops=ops)

    def kv_cache_spec(self) -> list[LayerKVSpec]:
        c = self.config
        return [LayerKVSpec(c.num_key_value_heads, c.head_dim, c.sliding_window) for _ in range(c.num_hidden_layers)]

    def bind_kv_cache(self, caches: KVCaches) -> None:
        for layer, (k, v) in zip(self.layers, caches, strict=True):
            assert isinstance(layer, LlamaDecoderLayer)
            layer.self_attn.k_cache, layer.self_attn.v_cache = k, v
        self.kv_caches = caches

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, hidden]
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return F.linear(hidden, self.embed_tokens.weight).float()  # [S, vocab]
        return self.lm_head(hidden).float()  # [S, vocab]

    def quantizable_layers(self) -> dict[str, Linear]:
        return {name: m for name, m in self.named_modules() if isinstance(m, Linear)}

    def quantize(self, method: str, group_size: int | None = None, lm_head: str | None = "int8") -> None:
        """Quantize every still-dense projection with ``method`` (a registered method or spec: "int8" per
        channel, "int4" group ``group_size`` (default 128), "int4-g64", ...); the lm_head (for tied models: a
        quantized copy of the embedding, which itself stays dense for lookups) gets ``lm_head`` (int8 per
        channel by default, None keeps it float)."""
        spec = parse_method(method)
        assert spec.method is not None
        qm = get_method(spec.method)
        for name, m in self.quantizable_layers().items():
            if m.quantized or name == "lm_head":
                continue
            assert m.weight is not None
            qw = qm.quantize_weight(m.weight.data, group_size or spec.group_size)
            if qw is not None:
                m.set_quantized(qw, qm)
        if lm_head is None or (self.lm_head is not None and self.lm_head.quantized):
            return
        head_spec = parse_method(lm_head)
        assert head_spec.method is not None
        hm = get_method(head_spec.method)
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        assert w is not None
        qw = hm.quantize_weight(w.data, head_spec.group_size)
        if qw is not None:
            self._set_lm_head(qw, hm)

    def _new_lm_head(self) -> Linear:
        with torch.device(self.embed_tokens.weight.device):  # beside the model, wherever it lives
            return Linear(self.config.hidden_size, self.config.vocab_size, dtype=self.dtype, ops=self.ops)

    def _set_lm_head(self, qw: QuantizedWeight, method: QuantMethod | None = None) -> None:
        if self.lm_head is None:
            self.lm_head = self._new_lm_head()
        self.lm_head.set_quantized(qw, method)

    def _untied_lm_head(self) -> Linear:
        """The dense lm_head; a tied model gets its own copy of the embedding first (and an untied config)."""
        if self.lm_head is None:
            self.lm_head = self._new_lm_head()
            assert self.lm_head.weight is not None
            self.lm_head.weight.data.copy_(self.embed_tokens.weight.data)
            self.config = dataclasses.replace(self.config, tie_word_embeddings=False)
        return self.lm_head

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

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named checkpoint tensors (``model.layers.0.self_attn.q_proj.weight``...) into the fused
        parameters; raises on unknown names, shape mismatches or missing weights."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        shards_seen: dict[str, set[int]] = {}
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                if isinstance(tensor, QuantizedWeight):  # a quantized copy of a tied embedding
                    self._set_lm_head(tensor)
                continue  # tied: some checkpoints store the copy anyway
            for src, (dst, shard) in self.STACKED.items():
                if f".{src}." in name:
                    target = name.replace(f".{src}.", f".{dst}.")
                    module_name, kind = target.rsplit(".", 1)
                    module = self.get_submodule(module_name)
                    assert isinstance(module, Linear)
                    module.load_shard(kind, shard, tensor)
                    shards_seen.setdefault(target, set()).add(shard)
                    break
            else:
                if isinstance(tensor, QuantizedWeight):
                    module = self.get_submodule(name.rsplit(".", 1)[0]) if name.endswith(".weight") else None
                    if not isinstance(module, Linear):
                        raise ValueError(f"checkpoint tensor {name!r} is quantized but is not a linear weight")
                    module.set_quantized(tensor)
                    loaded.add(name)
                    continue
                if name not in params:
                    raise ValueError(f"checkpoint tensor {name!r} has no place in {self.config.architecture}")
                p = params[name]
                if tuple(p.shape) != tuple(tensor.shape):
                    raise ValueError(f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)}, "
                                     f"model expects {tuple(p.shape)}")
                p.data.copy_(tensor)
                loaded.add(name)
        for target, seen in shards_seen.items():
            module = self.get_submodule(target.rsplit(".", 1)[0])
            assert isinstance(module, Linear)
            if len(seen) == len(module.shard_sizes):
                loaded.add(target)
        params = dict(self.named_parameters())  # quantized layers have dropped their float weight
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:4]}")
