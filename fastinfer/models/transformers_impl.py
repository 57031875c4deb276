"""The generic path: any ``AutoModelForCausalLM`` architecture transformers knows, served with its own modules.

The HF model is built on the meta device, then materialised on the serving device (every parameter left
empty for the checkpoint, the non-persistent buffers such as RoPE frequencies recomputed by transformers' own
initialisation, the way ``from_pretrained`` does) and filled from the safetensors tensors (by its state-dict
names; a layout transformers converts at load, such as per-expert MoE tensors, through transformers' own
conversion routine). Its attention goes through transformers' attention interface to
:func:`paged_attention_forward` (registered as ``"fastinfer"`` and set as the config's attention
implementation): the already-rotated k and v go into the paged KV cache with ``ops.store_kv`` and the output
comes from ``ops.paged_attention`` over the step's :class:`AttentionMetadata`. With a custom implementation,
transformers' mask builders return no mask, so no dense [T, T] mask exists; the packed token stream runs as a
batch of one [1, T] with its positions as ``position_ids``.

Each attention layer's shape (KV heads, head size) and options (sliding window, soft-cap) are read from one
forward on the meta device (a probe that computes nothing; on the device with zeroed weights when meta tensors
cannot run the forward), which also proves the model's code calls the interface: a model that does not (its
attention is hand-written, or it builds its own mask or biases such as ALiBi) gets a clear error. Remote code
is never run. The logits are the CausalLM's own head applied to our hidden states (its forward with the body
bypassed), so a family's logit scaling or soft-capping is kept.
"""
from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastinfer.config import ModelConfig
from fastinfer.layers.kv_rotation import key_rotation, rotate
from fastinfer.models.interface import KVCaches, LayerKVSpec, model_dtype
from fastinfer.ops import AttentionMetadata, OpSet
from fastinfer.quantization.format import QuantizedWeight

logger = logging.getLogger("fastinfer")

ATTN_IMPLEMENTATION = "fastinfer"
_UNSUPPORTED_KWARGS = ("s_aux", "sinks", "position_bias")  # attention sinks, relative position biases
_NO_QUANT = ("quantization is not supported on the generic path (transformers' modules keep their own "
             "nn.Linear layers); serve {arch} unquantized, or add a native class for it")


@dataclass
class _Step:
    """What every attention layer of one model reads during a forward: the op set and the step's metadata."""

    ops: OpSet
    meta: AttentionMetadata | None = None


class PagedLayer:
    """One HF attention module's place in the paged cache (attached to it as ``fastinfer_paged``)."""

    def __init__(self, step: _Step, num_heads: int, num_kv_heads: int, head_size: int,
                 sliding_window: int | None, softcap: float | None) -> None:
        self.step, self.num_heads, self.num_kv_heads, self.head_size = step, num_heads, num_kv_heads, head_size
        self.sliding_window, self.softcap = sliding_window, softcap
        self.k_cache = self.v_cache = torch.empty(0)
        self.key_rotation: torch.Tensor | None = None  # a quantized cache's q/k rotation (layers.kv_rotation)

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None,
                 ) -> torch.Tensor:
        meta, ops = self.step.meta, self.step.ops
        if meta is None:
            raise RuntimeError("a fastinfer attention layer ran outside TransformersForCausalLM.forward")
        meta = meta.for_window(self.sliding_window)  # this layer's KV cache group: its block table and slots
        q = rotate(query[0].transpose(0, 1), self.key_rotation).contiguous()  # [1, H, T, D] -> [T, H, D]
        k = rotate(key[0].transpose(0, 1), self.key_rotation).contiguous()
        ops.store_kv(k, value[0].transpose(0, 1).contiguous(), self.k_cache, self.v_cache, meta.slot_mapping)
        scale = self.head_size ** -0.5 if scaling is None else scaling
        extra = {} if self.softcap is None else {"softcap": self.softcap}
        o = ops.paged_attention(q, self.k_cache, self.v_cache, meta, scale, self.sliding_window, **extra)
        return o.unsqueeze(0)  # [1, T, H, D], the layout transformers' attention functions return


@dataclass
class _ProbeCall:
    module: nn.Module
    num_heads: int
    num_kv_heads: int
    head_size: int
    sliding_window: int | None
    softcap: float | None


_probe: list[_ProbeCall] | None = None  # set while a probe forward runs


def paged_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None,
                            dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [1, H, T, D], key / value [1, Hkv, T, D] (rotated)."""
    layer = getattr(module, "fastinfer_paged", None)
    if layer is not None:
        return layer(query, key, value, scaling), None
    if _probe is None:
        raise RuntimeError(f"{type(module).__name__} uses the {ATTN_IMPLEMENTATION!r} attention implementation "
                           "but was not set up by fastinfer.models.transformers_impl.TransformersForCausalLM")
    _probe.append(_record(module, query, key, value, attention_mask, kwargs))
    return query.new_empty(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None


def _record(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            attention_mask: torch.Tensor | None, kwargs: dict[str, Any]) -> _ProbeCall:
    name = type(module).__name__
    if attention_mask is not None:
        raise ValueError(f"{name} is given an attention mask or bias built by the model itself (e.g. ALiBi), "
                         "which paged attention cannot apply: not servable on the generic path")
    bad = [k for k in _UNSUPPORTED_KWARGS if kwargs.get(k) is not None]
    if bad:
        raise ValueError(f"{name} passes {bad} to its attention function, which fastinfer's paged attention "
                         "does not implement: not servable on the generic path")
    if key.shape != value.shape or query.shape[-1] != key.shape[-1] or query.shape[1] % key.shape[1]:
        raise ValueError(f"{name}: query {tuple(query.shape)}, key {tuple(key.shape)} and value "
                         f"{tuple(value.shape)} are not a (grouped-query) attention fastinfer can page")
    if _probe and any(c.module is module for c in _probe):
        raise ValueError(f"{name} runs more than once per forward (shared layers): not servable on the generic path")
    window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
    return _ProbeCall(module, query.shape[1], key.shape[1], key.shape[-1],
                      None if window is None else int(window), None if softcap is None else float(softcap))


@contextmanager
def _probing() -> Iterator[list[_ProbeCall]]:
    global _probe
    calls: list[_ProbeCall] = []
    _probe = calls
    try:
        yield calls
    finally:
        _probe = None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)


def hf_config(cfg: ModelConfig) -> Any:
    """The transformers config object of ``cfg``'s ``config.json``, with our attention implementation."""
    from transformers import AutoConfig

    raw = dict(cfg.hf_config)
    if raw.get("auto_map"):
        raise ValueError(f"{cfg.architecture}: the checkpoint ships its own modelling code (auto_map); fastinfer "
                         "never runs remote code (trust_remote_code)")
    model_type = raw.pop("model_type", None) or cfg.model_type
    try:
        c = AutoConfig.for_model(model_type, **raw)
    except (ValueError, KeyError) as e:
        raise ValueError(f"transformers cannot read the config of model_type {model_type!r}: {e}") from e
    c._attn_implementation = ATTN_IMPLEMENTATION
    return c


def _build_on_meta(cfg: ModelConfig, dtype: torch.dtype) -> Any:
    import transformers

    c = hf_config(cfg)
    cls: Any = getattr(transformers, cfg.architecture)  # a causal-LM class name (registry.choose_impl checked)
    if not isinstance(c, cls.config_class):
        raise ValueError(f"config.json names the architecture {cfg.architecture} but its model_type "
                         f"{c.model_type!r} is not that class's ({cls.config_class.model_type!r})")
    with torch.device("meta"):
        try:
            return cls._from_config(c, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION)
        except KeyError as e:  # a model that looks its attention class up by implementation name
            raise ValueError(f"{cls.__name__} does not accept a custom attention implementation ({e!r}): not "
                             "servable on the generic path") from e


def _probe_forward(model: TransformersForCausalLM, device: torch.device) -> list[_ProbeCall]:
    """One forward of two tokens and the head on ``device``, recording each attention call in order."""
    with _probing() as calls, torch.device(device):
        hidden = model._body(input_ids=torch.zeros(1, 2, dtype=torch.long), position_ids=torch.arange(2)[None],
                             use_cache=False).last_hidden_state
        model.compute_logits(hidden[0])
    return calls


def _probe_attention(model: TransformersForCausalLM, name: str, device: torch.device) -> list[_ProbeCall]:
    """The attention calls of one forward on the meta device (shapes only). A forward meta tensors cannot run
    (data-dependent ops such as MoE routing) is probed on ``device`` instead, materialised with zeroed weights."""
    try:
        calls = _probe_forward(model, torch.device("meta"))
    except ValueError:
        raise
    except Exception as e:
        logger.info("%s: no forward on the meta device (%s: %s); probing on %s with zeroed weights", name,
                    type(e).__name__, str(e).splitlines()[0][:120], device)
        _materialise(model.hf, device)
        for p in model.hf.parameters():
            p.data.zero_()
        try:
            calls = _probe_forward(model, device)
        except ValueError:
            raise
        except Exception as e2:
            raise ValueError(f"{name}: the shape probe (one forward of two tokens) failed ({type(e2).__name__}: "
                             f"{e2}); not servable on the generic path") from e2
    if not calls:
        raise ValueError(f"{name} never called transformers' attention interface in its forward (its attention "
                         "is computed by its own code): not servable on the generic path")
    types = getattr(model.hf.config, "layer_types", None) or []
    if "sliding_attention" in types and all(c.sliding_window is None for c in calls):
        raise ValueError(f"{name} has sliding-window layers but passes no sliding_window to its attention "
                         "function, so the generic path cannot tell which layers slide")
    return calls


def _materialise(hf: nn.Module, device: torch.device) -> None:
    """Real (uninitialised) storage on ``device`` for every meta tensor; the non-persistent buffers (RoPE
    frequencies, ...) recomputed by the model's own initialisation, parameters skipped (the checkpoint fills
    them); tied weights tied again."""
    hf.to_empty(device=device)
    for p in hf.parameters():
        p._is_hf_initialized = True  # type: ignore[attr-defined]
    hf.initialize_weights()  # type: ignore[operator]
    hf.tie_weights()  # type: ignore[operator]
    hf.eval()
    hf.requires_grad_(False)


class _PassThrough(nn.Module):
    """Stands in for the HF decoder in :meth:`TransformersForCausalLM.compute_logits`: returns the given hidden
    states, so the CausalLM's forward applies only its head (and whatever it does to the logits)."""

    def forward(self, *args: Any, inputs_embeds: torch.Tensor | None = None, **kwargs: Any) -> Any:
        return _hidden_output(inputs_embeds)


def _hidden_output(hidden: torch.Tensor | None) -> Any:
    """A body output holding only ``last_hidden_state``; every other field a head may read (cross attentions,
    router logits, ...) is None."""
    return _hidden_only_class()(last_hidden_state=hidden)


@functools.cache
def _hidden_only_class() -> Any:
    from transformers.modeling_outputs import BaseModelOutputWithPast

    class HiddenOnly(BaseModelOutputWithPast):
        def __getattr__(self, name: str) -> None:
            if name.startswith("__"):
                raise AttributeError(name)
            return None

    return HiddenOnly


class TransformersForCausalLM(nn.Module):
    """The :class:`~fastinfer.models.interface.CausalLM` protocol over a transformers ``*ForCausalLM`` module
    (``self.hf``). Quantization is not supported (a clear error)."""

    hf: Any  # the transformers *ForCausalLM
    _body: Any  # its decoder stack (kept out of our own module tree: it lives in self.hf)

    def __init__(self, cfg: ModelConfig, ops: OpSet, dtype: torch.dtype) -> None:
        super().__init__()
        self.config, self.ops, self.dtype = cfg, ops, dtype
        self.kv_caches: KVCaches = []
        self.hf = _build_on_meta(cfg, dtype)
        self._prefix = self.hf.base_model_prefix
        body = self.hf.get_decoder()  # the stack that maps input ids to the final hidden states
        path = next((n for n, m in self.hf.named_modules() if m is body and n), None)
        if path is None:
            raise ValueError(f"{type(self.hf).__name__} has no separate decoder module: not servable on the "
                             "generic path")
        parent, _, self._body_attr = path.rpartition(".")
        self._body_parent = self.hf.get_submodule(parent)
        object.__setattr__(self, "_body", body)
        device = torch.get_default_device()
        calls = _probe_attention(self, type(self.hf).__name__, device)
        if next(self.hf.parameters()).is_meta:
            _materialise(self.hf, device)
        self._step = _Step(ops)
        self.layers: list[PagedLayer] = []
        for c in calls:
            layer = PagedLayer(self._step, c.num_heads, c.num_kv_heads, c.head_size, c.sliding_window, c.softcap)
            setattr(c.module, "fastinfer_paged", layer)  # noqa: B010 - an nn.Module's plain attribute
            self.layers.append(layer)
        windows = sorted({c.sliding_window for c in calls if c.sliding_window is not None})
        logger.info("generic path: %s runs on transformers' own modules (%d attention layers%s) with fastinfer's "
                    "paged attention", type(self.hf).__name__, len(calls),
                    f", sliding windows {windows}" if windows else "")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata,
                ) -> torch.Tensor:
        self._step.ops, self._step.meta = self.ops, attn_metadata
        try:
            out = self._body(input_ids=input_ids[None], position_ids=positions[None], use_cache=False)
        finally:
            self._step.meta = None
        return out.last_hidden_state[0]  # [T, hidden]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        setattr(self._body_parent, self._body_attr, _PassThrough())
        try:
            logits = self.hf(inputs_embeds=hidden[None], use_cache=False).logits
        finally:
            setattr(self._body_parent, self._body_attr, self._body)
        return logits[0].float()  # [S, vocab]

    def kv_cache_spec(self) -> list[LayerKVSpec]:
        return [LayerKVSpec(la.num_kv_heads, la.head_size, la.sliding_window) for la in self.layers]

    def bind_kv_cache(self, caches: KVCaches) -> None:
        dtype = model_dtype(self)
        for layer, (k, v) in zip(self.layers, caches, strict=True):
            layer.k_cache, layer.v_cache = k, v
            layer.key_rotation = key_rotation(k, layer.head_size, dtype)
        self.kv_caches = caches

    def quantizable_layers(self) -> dict[str, Any]:
        return {}  # transformers' nn.Linear layers are not fastinfer Linears

    def quantize(self, method: str, group_size: int | None = None, lm_head: str | None = "int8") -> None:
        raise ValueError(_NO_QUANT.format(arch=self.config.architecture))

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        """Copy checkpoint tensors into the HF model by its own state-dict names (with or without the body's
        prefix, as transformers accepts them); the rest (layouts transformers converts at load: per-expert MoE
        tensors, legacy names) through transformers' own conversions. Raises on tensors with no place, shape
        mismatches or missing weights."""
        arch = self.config.architecture
        targets = self.hf.state_dict(keep_vars=True)
        ignore = [re.compile(p) for p in (getattr(self.hf, "_keys_to_ignore_on_load_unexpected", None) or [])]
        ignore.append(re.compile(r"rotary_emb\.inv_freq$"))
        loaded: set[int] = set()
        pending: dict[str, torch.Tensor] = {}
        for name, tensor in weights:
            if isinstance(tensor, QuantizedWeight):
                raise ValueError(_NO_QUANT.format(arch=arch) + f" (checkpoint tensor {name!r} is quantized)")
            key = name if name in targets else f"{self._prefix}.{name}"
            if key not in targets:
                if not any(p.search(name) for p in ignore):
                    pending[name] = tensor
                continue
            dst = targets[key]
            if tuple(dst.shape) != tuple(tensor.shape):
                raise ValueError(f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)}, model expects "
                                 f"{tuple(dst.shape)}")
            dst.data.copy_(tensor)
            loaded.add(id(dst))
        converted = _load_converted(self.hf, pending, self.dtype, arch) if pending else set()
        missing = [n for n, p in self.hf.named_parameters() if id(p) not in loaded and n not in converted]
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:4]}")


def _load_converted(hf: Any, tensors: dict[str, torch.Tensor], dtype: torch.dtype, arch: str) -> set[str]:
    """Load ``tensors`` through transformers' checkpoint conversions for ``hf`` (its own loader's routine);
    returns the names of the parameters they filled. ValueError if any tensor finds no place."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig
    from transformers.utils import logging as hf_logging

    device = next(hf.parameters()).device
    mapping: Any = get_model_conversion_mapping(hf)
    config = LoadStateDictConfig(dtype=dtype, weight_mapping=mapping, device_map={"": device})
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        info, _ = convert_and_load_state_dict_in_model(model=hf, state_dict=tensors, load_config=config)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    bad = sorted(info.unexpected_keys) + [k for k, *_ in info.mismatched_keys]
    if bad or info.conversion_errors or info.error_msgs:
        why = info.conversion_errors or info.error_msgs or ""
        raise ValueError(f"checkpoint tensors {bad[:4] or sorted(tensors)[:4]} have no place in transformers' "
                         f"{arch}, even through its own checkpoint conversions {why}")
    hf.tie_weights()
    logger.info("generic path: %d checkpoint tensors loaded through transformers' checkpoint conversions",
                len(tensors))
    return {n for n, _ in hf.named_parameters()} - set(info.missing_keys)

_register()
