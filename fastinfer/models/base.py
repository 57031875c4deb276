"""What every native family shares: HF-named checkpoint tensors into (fused) :class:`Linear` layers, weight
quantization, the (tied) lm_head, the KV-cache spec and binding through its :class:`SelfAttention` layers, and
logits. A family subclasses :class:`DecoderForCausalLM`, builds its modules and ``forward``, and describes how
its checkpoint names map to its modules with four class attributes:

- ``PREFIXES``: stripped from the front of checkpoint names (the first that matches), e.g. ``"model."``;
- ``IGNORED``: regexes of checkpoint tensors that have no place (RoPE buffers, causal-mask buffers);
- ``RENAMES``: ``(regex, replacement)`` pairs applied in order, HF module names to ours. Our own names (what
  ``state_dict`` and :func:`fastinfer.models.loader.save_quantized` write) must pass through unchanged, so a saved
  model loads back;
- ``STACKED``: checkpoint name fragment -> (our fused module's fragment, shard index), e.g. ``q_proj`` -> shard
  0 of ``qkv_proj``.

``convert_tensor`` (default: identity) rewrites a checkpoint tensor's layout by its HF name, e.g. GPT-2's Conv1D
weights ([in, out]) or GPT-NeoX's per-head interleaved q/k/v rows.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fastinfer.config import ModelConfig
from fastinfer.distributed.communication import all_gather
from fastinfer.distributed.parallel_state import tp_rank, tp_size
from fastinfer.distributed.sharding import materialize, narrow, row_group_size, vocab_shard
from fastinfer.layers.attention import SelfAttention
from fastinfer.layers.embedding import VocabParallelEmbedding, token_embedding
from fastinfer.layers.linear import Linear
from fastinfer.layers.moe import SparseMoeBlock
from fastinfer.models.interface import KVCaches, LayerKVSpec, RotationPlan
from fastinfer.ops import AttentionMetadata, OpSet
from fastinfer.quantization.format import QuantizedWeight
from fastinfer.quantization.methods import QuantMethod, resolve_method


def input_norm(norm: nn.Module, x: torch.Tensor, residual: torch.Tensor | None,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's first norm over the stream: ``(norm(x), x)`` for the first layer (no residual yet), else the fused
    ``norm(x, residual)`` -> ``(norm(residual + x), residual + x)``."""
    if residual is None:
        return norm(x), x
    return norm(x, residual)


class PreNormDecoderLayer(nn.Module):
    """``x += attn(norm1(x)); x += mlp(norm2(x))`` with the residual carried beside the stream, so each norm
    fuses the add (RMSNorm's ``fused_add_rms_norm``). Subclasses create ``input_layernorm``, ``self_attn``,
    ``post_attention_layernorm`` and ``mlp``; the model applies its final norm to (x, residual)."""

    input_layernorm: nn.Module
    self_attn: nn.Module
    post_attention_layernorm: nn.Module
    mlp: nn.Module

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = input_norm(self.input_layernorm, x, residual)
        h = self.self_attn(positions, h, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class DecoderForCausalLM(nn.Module):
    """Base of the native families (see the module docstring). ``__init__`` creates ``embed_tokens``; the
    subclass creates its layers, then assigns ``self.lm_head = self.new_lm_head()`` (None for tied models).

    Tensor parallelism (``SUPPORTS_TP``): the embedding and the lm_head are split by vocabulary rows, each rank's
    logits all-gathered in :meth:`compute_logits` (only the rows being sampled), and checkpoint tensors narrowed
    to this rank's slices as they load; a family whose layers do not shard leaves it False (a clear error)."""

    PREFIXES: ClassVar[tuple[str, ...]] = ("model.",)
    IGNORED: ClassVar[tuple[str, ...]] = (r"rotary_emb\.inv_freq$",)
    RENAMES: ClassVar[tuple[tuple[str, str], ...]] = ()
    STACKED: ClassVar[dict[str, tuple[str, int]]] = {}
    SUPPORTS_TP: ClassVar[bool] = False

    def __init__(self, cfg: ModelConfig, ops: OpSet, dtype: torch.dtype) -> None:
        super().__init__()
        if tp_size() > 1 and not self.SUPPORTS_TP:
            raise ValueError(f"tensor parallelism is not supported for {cfg.architecture} (supported: the Llama "
                             "family: Llama, Mistral, Qwen2, Qwen3, SmolLM, Phi-3); use tensor_parallel_size=1")
        self.config = cfg
        self.ops, self.dtype = ops, dtype
        self.tp_rank, self.tp_size = tp_rank(), tp_size()  # fixed at construction (a model is one rank's)
        self.kv_caches: KVCaches = []
        self.embed_tokens = token_embedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.lm_head: Linear | None = None

    def new_lm_head(self) -> Linear | None:
        """The untied lm_head; None when the config ties it to the embedding (until quantization gives the model
        a quantized copy of the embedding)."""
        return None if self.config.tie_word_embeddings else self._head_linear()

    def _head_linear(self) -> Linear:
        """The lm_head's layer: all of the vocabulary, or this rank's rows under tensor parallelism."""
        v = self.config.vocab_size
        if self.tp_size == 1:
            return Linear(self.config.hidden_size, v, dtype=self.dtype, ops=self.ops)
        start, rows, _ = vocab_shard(v, self.tp_rank, self.tp_size)
        return Linear(self.config.hidden_size, rows, dtype=self.dtype, ops=self.ops, parallel="column",
                      tp_shards=((start, v),))

    # -- the KV cache ---------------------------------------------------------------------------------------------

    def attention_layers(self) -> list[SelfAttention]:
        return [m for m in self.modules() if isinstance(m, SelfAttention)]

    def kv_cache_spec(self) -> list[LayerKVSpec]:
        return [LayerKVSpec(a.num_kv_heads, a.head_dim, a.sliding_window) for a in self.attention_layers()]

    def bind_kv_cache(self, caches: KVCaches) -> None:
        for attn, (k, v) in zip(self.attention_layers(), caches, strict=True):
            attn.bind_cache(k, v)
        self.kv_caches = caches

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            logits = F.linear(hidden, self.embed_tokens.weight).float()  # [S, vocab (this rank's rows)]
        else:
            logits = self.lm_head(hidden).float()
        if self.tp_size == 1:
            return logits
        v = self.config.vocab_size
        _, rows, per = vocab_shard(v, self.tp_rank, self.tp_size)
        return all_gather(F.pad(logits, (0, per - rows)), dim=-1)[:, :v]  # [S, vocab] on every rank

    def moe_layers(self) -> list[nn.Module]:
        return [m for m in self.modules() if isinstance(m, SparseMoeBlock)]

    def rotation_plan(self) -> RotationPlan:
        raise ValueError(f"{self.config.architecture} does not support Hadamard rotation (only RMSNorm pre-norm "
                         "families describe their residual stream)")

    # -- quantization ---------------------------------------------------------------------------------------------

    def quantizable_layers(self) -> dict[str, Linear]:
        return {name: m for name, m in self.named_modules() if isinstance(m, Linear)}

    def quantize(self, method: str, group_size: int | None = None, lm_head: str | None = "int8") -> None:
        """Quantize every still-dense projection with ``method`` (a registered method or spec: "int8" per
        channel, "int4" group ``group_size`` (default 128), "int4-g64", ...); the lm_head (for tied models: a
        quantized copy of the embedding, which itself stays dense for lookups) gets ``lm_head`` (int8 per
        channel by default, None keeps it float)."""
        qm, group = resolve_method(method, group_size)
        for name, m in self.quantizable_layers().items():
            if m.quantized or name == "lm_head":
                continue
            assert m.weight is not None
            qw = qm.quantize_weight(m.weight.data, self._row_group(qm, m, group))
            if qw is not None:
                m.set_quantized(qw, qm)
        if lm_head is None or (self.lm_head is not None and self.lm_head.quantized):
            return
        hm, head_group = resolve_method(lm_head)
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        assert w is not None
        qw = hm.quantize_weight(w.data, head_group)
        if qw is not None:
            self._set_lm_head(qw, hm)

    @staticmethod
    def _row_group(qm: QuantMethod, m: Linear, requested: int | None) -> int | None:
        """The group size for ``m``: a row-parallel shard takes the group one process would give the whole K
        (:func:`~fastinfer.distributed.sharding.row_group_size`)."""
        if m.parallel != "row":
            return requested
        return row_group_size(qm, m.tp_shards[0][1], m.in_features, m.tp_size, requested)

    def _new_lm_head(self) -> Linear:
        with torch.device(self.embed_tokens.weight.device):  # beside the model, wherever it lives
            return self._head_linear()

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

    # -- loading --------------------------------------------------------------------------------------------------

    def checkpoint_name(self, name: str) -> str | None:
        """Our parameter name for checkpoint tensor ``name`` (None: a tensor to skip)."""
        for prefix in self.PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        if any(re.search(p, name) for p in self.IGNORED):
            return None
        for pattern, repl in self.RENAMES:
            name = re.sub(pattern, repl, name)
        return name

    def convert_tensor(self, hf_name: str, tensor: Any) -> Any:
        """Rewrite checkpoint tensor ``hf_name``'s layout into ours (default: as stored)."""
        return tensor

    def load_custom(self, name: str, tensor: Any) -> list[str] | None:
        """Load checkpoint tensor ``name`` (our name, after ``RENAMES``) into a parameter the generic rules do not
        cover, e.g. one expert's slice of stacked MoE weights: None when not handled here, else the parameters
        now complete (default: handles nothing)."""
        return None

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        """Copy HF-named checkpoint tensors (``model.layers.0.self_attn.q_proj.weight``...) into the fused
        parameters; raises on unknown names, shape mismatches or missing weights."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        shards_seen: dict[str, set[int]] = {}
        for hf_name, tensor in weights:
            name = self.checkpoint_name(hf_name)
            if name is None:
                continue
            tensor = self.convert_tensor(hf_name, tensor)
            done = self.load_custom(name, tensor)
            if done is not None:
                loaded.update(done)
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                if isinstance(tensor, QuantizedWeight):  # a quantized copy of a tied embedding
                    if self.tp_size > 1:
                        start, rows, _ = vocab_shard(self.config.vocab_size, self.tp_rank, self.tp_size)
                        tensor = narrow(tensor, 0, start, rows)
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
                self._load_whole(name, tensor, params)
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

    def _load_whole(self, name: str, tensor: Any, params: dict[str, nn.Parameter]) -> None:
        owner = self._owner(name)
        if isinstance(owner, (Linear, VocabParallelEmbedding)) and owner.parallel and self.tp_size > 1:
            owner.load_whole(name.rsplit(".", 1)[1], tensor)  # narrowed to this rank's slice
            return
        tensor = materialize(tensor)
        if isinstance(tensor, QuantizedWeight):
            module = self.get_submodule(name.rsplit(".", 1)[0]) if name.endswith(".weight") else None
            if not isinstance(module, Linear):
                raise ValueError(f"checkpoint tensor {name!r} is quantized but is not a linear weight")
            module.set_quantized(tensor)
            return
        if name not in params:
            raise ValueError(f"checkpoint tensor {name!r} has no place in {self.config.architecture}")
        p = params[name]
        if tuple(p.shape) != tuple(tensor.shape):
            raise ValueError(f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)}, "
                             f"model expects {tuple(p.shape)}")
        p.data.copy_(tensor)


    def _owner(self, name: str) -> nn.Module | None:
        """The module holding parameter ``name`` (None when there is none)."""
        try:
            return self.get_submodule(name.rsplit(".", 1)[0]) if "." in name else None
        except AttributeError:
            return None


def layer_sliding_window(cfg: ModelConfig, index: int) -> int | None:
    """Layer ``index``'s attention window: ``cfg.sliding_window``, except for layers that the HF config's
    ``layer_types`` marks ``"full_attention"`` (Qwen2/3 with ``max_window_layers``, Gemma's global layers)."""
    types = cfg.hf_config.get("layer_types")
    if isinstance(types, list) and index < len(types) and types[index] == "full_attention":
        return None
    return cfg.sliding_window
