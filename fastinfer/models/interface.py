"""The one interface every model family implements, and the helpers built on it alone.

A model maps packed token ids [T] and positions [T] (plus the step's :class:`AttentionMetadata`) to hidden
states [T, hidden]; ``compute_logits`` maps selected hidden states to fp32 logits. Everything outside
``models/`` (the worker, the draft proposer, quantization, calibration, rotation, evaluation) uses only this
protocol, so a new family is one file plus one line in :mod:`fastinfer.models.registry`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from fastinfer.config import ModelConfig
from fastinfer.ops import AttentionMetadata, OpSet

if TYPE_CHECKING:
    from fastinfer.layers.linear import Linear

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class LayerKVSpec:
    """What one attention layer keeps in the paged cache: ``num_kv_heads`` x ``head_size`` per token, and its
    sliding window (None: the layer attends to the whole context)."""

    num_kv_heads: int
    head_size: int
    sliding_window: int | None = None


@dataclass(frozen=True)
class ValueHeads:
    """Where one attention block's per-head value space lives: rows ``start .. start + num_kv_heads * head_dim``
    of ``producer``'s weight (and bias) are the values, head by head; ``consumer`` reads the attention output,
    ``num_heads * head_dim`` columns, head by head (query head h reads KV head h // (num_heads // num_kv_heads))."""

    producer: Linear
    start: int
    num_kv_heads: int
    consumer: Linear
    num_heads: int
    head_dim: int


@dataclass(frozen=True)
class ResidualBlock:
    """One pre-norm sub-block of the residual stream: ``stream += writers(f(readers(norm(stream))))``. ``norm`` is
    the RMSNorm's weight [hidden], ``readers`` the projections that read the normed stream, ``writers`` those
    whose output is added to it; ``values`` when the block is attention (its value space can be rotated too)."""

    norm: torch.Tensor
    readers: tuple[Linear, ...]
    writers: tuple[Linear, ...]
    values: ValueHeads | None = None


@dataclass(frozen=True)
class RotationPlan:
    """A model's residual-stream structure, for :func:`fastinfer.quantization.rotation.rotate_model`: the token
    embedding [vocab, hidden] (a parameter), the residual blocks in order, the final norm's weight [hidden], and
    ``lm_head()``, which returns the dense lm_head, untied into its own copy of the embedding first when the
    model ties them (a rotated head differs from the rotated embedding)."""

    embedding: torch.Tensor
    blocks: tuple[ResidualBlock, ...]
    final_norm: torch.Tensor
    lm_head: Callable[[], Linear] = field(compare=False)


@runtime_checkable
class CausalLM(Protocol):
    """A decoder served by the engine. Built as ``cls(config, ops, dtype)`` (under a ``torch.device``
    context: parameters are created on the serving device), then ``load_weights`` from HF-named tensors."""

    config: ModelConfig

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata,
                ) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None: ...

    def kv_cache_spec(self) -> list[LayerKVSpec]: ...

    def bind_kv_cache(self, caches: KVCaches) -> None: ...

    def quantizable_layers(self) -> dict[str, Linear]: ...

    def quantize(self, method: str, group_size: int | None = None, lm_head: str | None = "int8") -> None: ...

    def rotation_plan(self) -> RotationPlan:
        """The residual-stream structure (see :class:`RotationPlan`), for rotating the hidden spaces."""
        ...

    def moe_layers(self) -> list[torch.nn.Module]:
        """Optional: the Mixture-of-Experts blocks (:class:`fastinfer.layers.moe.SparseMoeBlock`), so
        quantization, draft proposers and tensor parallelism can treat experts as experts; [] for a dense model.
        Their experts are never among ``quantizable_layers``."""
        ...


def moe_blocks(model: Any) -> list[torch.nn.Module]:
    """``model.moe_layers()``, or [] for a model without the optional method (a dense model)."""
    fn = getattr(model, "moe_layers", None)
    return list(fn()) if callable(fn) else []


def build_model(config: ModelConfig, ops: OpSet, dtype: torch.dtype, device: torch.device | str) -> CausalLM:
    """The registered class for ``config.architecture`` (the generic class when ``config.model_impl`` is
    "transformers"), with its parameters allocated on ``device``."""
    from fastinfer.models.registry import resolve_model_class

    cls = resolve_model_class(config.architecture, config.model_impl)
    with torch.device(device):
        model = cls(config, ops, dtype)
    return model


# Cache element dtype of each quantized ``kv_cache_dtype`` (EngineConfig); rows then hold D codes + an fp16 scale.
QUANTIZED_KV_DTYPES = {"int8": torch.int8, "fp8_e4m3": torch.uint8}


def kv_cache_layout(dtype: torch.dtype, kv_cache_dtype: str = "auto") -> tuple[torch.dtype, int]:
    """(cache tensor dtype, extra elements per row) of a KV cache for a model of ``dtype``: "auto" is the model
    dtype; "int8" / "fp8_e4m3" are int8 / uint8 rows with two more bytes for the row's fp16 scale (the layout
    of :func:`fastinfer.ops.reference.quantize_kv_rows`)."""
    if kv_cache_dtype == "auto":
        return dtype, 0
    if kv_cache_dtype not in QUANTIZED_KV_DTYPES:
        raise ValueError(f"kv_cache_dtype must be 'auto' or one of {sorted(QUANTIZED_KV_DTYPES)}, "
                         f"got {kv_cache_dtype!r}")
    return QUANTIZED_KV_DTYPES[kv_cache_dtype], 2


def kv_bytes_per_token(spec: list[LayerKVSpec], dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
    """Bytes of K and V one token takes in every layer's cache (a quantized cache's scales included)."""
    cache_dtype, extra = kv_cache_layout(dtype, kv_cache_dtype)
    elem = torch.empty(0, dtype=cache_dtype).element_size()
    return sum(2 * s.num_kv_heads * (s.head_size + extra) * elem for s in spec)


def allocate_kv_caches(spec: list[LayerKVSpec], num_blocks: int | Sequence[int], block_size: int,
                       dtype: torch.dtype, device: torch.device | str = "cpu", kv_cache_dtype: str = "auto",
                       ) -> KVCaches:
    """One (k, v) pair of paged caches per layer, each [num_blocks, block_size, Hkv, D] (``num_blocks``: one count
    for every layer, or one per layer, as KV cache groups of sliding-window layers have their own); with a
    quantized ``kv_cache_dtype`` [num_blocks, block_size, Hkv, D + 2] int8 / uint8 (:func:`kv_cache_layout`).
    Uninitialised (pages are touched lazily): every attention backend reads only slots below seq_len that
    store_kv has written, never a block wholly before a sliding window, and the kernel tests poison the rest
    with NaN to prove it."""
    counts = [num_blocks] * len(spec) if isinstance(num_blocks, int) else list(num_blocks)
    if len(counts) != len(spec):
        raise ValueError(f"{len(counts)} block counts for {len(spec)} layers")
    cache_dtype, extra = kv_cache_layout(dtype, kv_cache_dtype)
    caches = []
    for s, n in zip(spec, counts):
        shape = (n, block_size, s.num_kv_heads, s.head_size + extra)
        caches.append((torch.empty(shape, dtype=cache_dtype, device=device),
                       torch.empty(shape, dtype=cache_dtype, device=device)))
    return caches


def model_device(model: Any) -> torch.device:
    return next(iter(model.buffers()), next(iter(model.parameters()))).device


def model_dtype(model: Any) -> torch.dtype:
    return next(p for p in model.parameters() if p.is_floating_point()).dtype


@contextlib.contextmanager
def scratch_kv_cache(model: CausalLM, num_tokens: int, block_size: int = 16, kv_cache_dtype: str = "auto",
                     ) -> Iterator[None]:
    """Run ``model`` with a private KV cache for ``num_tokens`` positions (blocks 0..n-1; ``kv_cache_dtype`` as
    :func:`allocate_kv_caches`), then rebind the caches it had (so an engine that owns the model keeps
    working): for evaluation and calibration passes."""
    saved = getattr(model, "kv_caches", None)
    model.bind_kv_cache(allocate_kv_caches(model.kv_cache_spec(), -(-num_tokens // block_size), block_size,
                                           model_dtype(model), model_device(model), kv_cache_dtype))
    try:
        yield
    finally:
        if saved:
            model.bind_kv_cache(saved)


def forward_sequence(model: CausalLM, ids: list[int], block_size: int = 16) -> torch.Tensor:
    """Hidden states [n, hidden] of one whole sequence from position 0, cached in blocks 0, 1, ...: a forward
    for use inside :func:`scratch_kv_cache` (evaluation, calibration)."""
    n = len(ids)
    device = model_device(model)
    meta = AttentionMetadata.build([n], [n], [list(range(-(-n // block_size)))], block_size, device)
    return model.forward(torch.tensor(ids, device=device), torch.arange(n, device=device), meta)


def forward_sequences(model: CausalLM, sequences: Sequence[Sequence[int]] | torch.Tensor, block_size: int = 16,
                      ) -> torch.Tensor:
    """Hidden states [B * T, hidden] of ``B`` whole sequences from position 0, packed in one step (prefill of
    every sequence), sequence ``i`` cached in its own blocks: for use inside :func:`scratch_kv_cache` sized for
    all of their tokens. Runs the model's own forward, so it is differentiable when the model's op set is
    (plain torch, outside inference mode)."""
    device = model_device(model)
    rows = sequences.tolist() if isinstance(sequences, torch.Tensor) else [list(s) for s in sequences]
    lens = [len(r) for r in rows]
    block_ids, first = [], 0
    for n in lens:
        nb = -(-n // block_size)
        block_ids.append(list(range(first, first + nb)))
        first += nb
    meta = AttentionMetadata.build(lens, lens, block_ids, block_size, device)
    ids = torch.tensor([t for r in rows for t in r], device=device)
    positions = torch.cat([torch.arange(n, device=device) for n in lens])
    return model.forward(ids, positions, meta)


@contextlib.contextmanager
def using_ops(model: CausalLM, ops: OpSet) -> Iterator[None]:
    """Run ``model`` with the op set ``ops`` (e.g. the plain-torch one, which autograd can differentiate), then
    give every module back its own. Models keep their op set as an ``ops`` attribute of their modules (the
    convention of ``fastinfer.layers``)."""
    saved = [(m, m.ops) for m in model.modules() if isinstance(getattr(m, "ops", None), OpSet)]  # type: ignore[attr-defined]
    for m, _ in saved:
        m.ops = ops
    try:
        yield
    finally:
        for m, own in saved:
            m.ops = own
