"""How a checkpoint splits over the tensor-parallel ranks: the divisibility rules (a clear error naming the
sizes that work), where each rank's attention heads and vocabulary rows are, and narrowing a checkpoint tensor
to this rank's slice. Tensors may be :class:`LazyTensor` s (a safetensors file's :class:`CheckpointSlice`, a GGUF
file's ``GGUFSlice``: not read yet), so a rank reads only its rows / columns from the file."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fastinfer.quantization.format import QuantizedWeight

if TYPE_CHECKING:
    from fastinfer.quantization.methods import QuantMethod


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def divide(n: int, tp: int, what: str) -> int:
    """``n // tp``; ValueError naming the valid sizes when ``tp`` does not divide ``n``."""
    if n % tp:
        raise ValueError(f"tensor_parallel_size={tp} does not divide {what}={n}; valid sizes: "
                         f"{', '.join(map(str, divisors(n)))}")
    return n // tp


@dataclass(frozen=True)
class HeadShard:
    """This rank's attention heads: query heads ``q_start .. q_start + num_heads`` and KV heads ``kv_start ..
    kv_start + num_kv_heads`` of the checkpoint (with more ranks than KV heads each KV head is replicated on
    ``tp / total_kv_heads`` ranks)."""

    num_heads: int
    num_kv_heads: int
    q_start: int
    kv_start: int


def head_shard(num_heads: int, num_kv_heads: int, rank: int, tp: int) -> HeadShard:
    if tp == 1:
        return HeadShard(num_heads, num_kv_heads, 0, 0)
    hq = divide(num_heads, tp, "num_attention_heads")
    if num_kv_heads % tp == 0:
        hkv = num_kv_heads // tp
        return HeadShard(hq, hkv, rank * hq, rank * hkv)
    if tp % num_kv_heads == 0:  # each KV head on tp / num_kv_heads ranks
        return HeadShard(hq, 1, rank * hq, rank // (tp // num_kv_heads))
    valid = [d for d in divisors(num_heads) if num_kv_heads % d == 0 or d % num_kv_heads == 0]
    raise ValueError(f"tensor_parallel_size={tp} neither divides num_key_value_heads={num_kv_heads} nor is a "
                     f"multiple of it; valid sizes: {', '.join(map(str, valid))}")


def vocab_shard(vocab: int, rank: int, tp: int) -> tuple[int, int, int]:
    """(first row, rows, padded rows per rank) of this rank's vocabulary slice: ``cdiv(vocab, tp)`` rows each,
    the last rank fewer (its logits are padded to the common width before the all-gather)."""
    per = -(-vocab // tp)
    start = rank * per
    rows = min(vocab, start + per) - start
    if per * (tp - 1) >= vocab:
        valid = [t for t in range(1, vocab + 1) if -(-vocab // t) * (t - 1) < vocab]
        raise ValueError(f"tensor_parallel_size={tp} leaves a rank without vocabulary rows (vocab_size={vocab}); "
                         f"valid sizes: up to {max(valid)}")
    return start, rows, per


def check_group_split(k: int, local: int, group: int, tp: int) -> None:
    """ValueError naming the valid sizes when splitting ``k`` input columns into ``tp`` shards of ``local`` cuts
    a quantization group of ``group`` columns (each rank must hold whole groups, one process's groups)."""
    if local % group:
        valid = [t for t in range(1, k + 1) if k % t == 0 and (k // t) % group == 0]
        raise ValueError(f"tensor_parallel_size={tp} splits K={k} into {local} columns, not a multiple of the "
                         f"quantization group size {group}; valid sizes: {', '.join(map(str, valid))} "
                         f"(or a smaller group)")


def row_group_size(qm: QuantMethod, k: int, local: int, tp: int, requested: int | None) -> int | None:
    """The group size for a row-parallel shard of ``local`` of ``k`` input columns: the group one process would
    give the whole K (so every rank's groups are one process's groups; ValueError naming the valid sizes when a
    shard boundary splits a group). Per-channel scales (int8) become per-shard-row scales."""
    try:
        g = qm.group_size(k, requested)
    except NotImplementedError:
        return requested
    if requested is None and g >= k:  # per channel: each rank's slice of the row gets its own scale
        return requested
    check_group_split(k, local, g, tp)
    return g


class LazyTensor:
    """A checkpoint tensor not read yet: :meth:`narrow` keeps a region, :meth:`tensor` reads only that region."""

    @property
    def shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def narrow(self, dim: int, start: int, size: int) -> LazyTensor:
        raise NotImplementedError

    def tensor(self) -> Any:
        raise NotImplementedError


class CheckpointSlice(LazyTensor):
    """A tensor of an open safetensors file, read only when :meth:`tensor` is called, and only the region that
    :meth:`narrow` calls have kept (safetensors' ``get_slice``)."""

    def __init__(self, handle: Any, index: tuple[slice, ...] | None = None) -> None:
        self.handle = handle
        full = tuple(int(s) for s in handle.get_shape())
        self.index = index if index is not None else tuple(slice(0, n) for n in full)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.index)

    def narrow(self, dim: int, start: int, size: int) -> CheckpointSlice:
        idx = list(self.index)
        base = idx[dim].start
        idx[dim] = slice(base + start, base + start + size)
        return CheckpointSlice(self.handle, tuple(idx))

    def tensor(self) -> torch.Tensor:
        return self.handle[self.index]


def materialize(t: Any) -> Any:
    """A :class:`LazyTensor` read (its region only); anything else as it is."""
    return t.tensor() if isinstance(t, LazyTensor) else t


def narrow(t: Any, dim: int, start: int, size: int) -> Any:
    """Rows (``dim`` 0) or columns (``dim`` 1) ``start .. start + size`` of a tensor, a :class:`CheckpointSlice`
    or a :class:`QuantizedWeight` (columns on group boundaries: ValueError naming the group size otherwise)."""
    if not isinstance(t, QuantizedWeight):
        return t.narrow(dim, start, size)
    if dim == 0:
        return QuantizedWeight(t.bits, t.group_size, t.qweight[start:start + size], t.scales[start:start + size],
                               None if t.mins is None else t.mins[start:start + size])
    g = t.group_size
    if start % g or size % g:
        k = t.shape[1]
        raise ValueError(f"a row-parallel shard of {size} input columns is not a multiple of the quantization group "
                         f"size {g} (K={k}); use a tensor_parallel_size with K / size a multiple of {g}")
    per_byte = 2 if t.bits == 4 else 1
    q = t.qweight[:, start // per_byte:(start + size) // per_byte]
    gs = slice(start // g, (start + size) // g)
    return QuantizedWeight(t.bits, g, q.contiguous(), t.scales[:, gs].contiguous(),
                           None if t.mins is None else t.mins[:, gs].contiguous())
