"""The collectives tensor parallelism needs, each a no-op (no call at all) when the group has one rank."""
from __future__ import annotations

import torch
import torch.distributed as dist

from fastinfer.distributed.parallel_state import group, tp_size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the ranks, in place; returns it."""
    if tp_size() > 1:
        dist.all_reduce(x, group=group())
    return x


def all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Every rank's ``x`` (same shape on all) concatenated along ``dim``, in rank order."""
    n = tp_size()
    if n == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x, group=group())
    return torch.cat(parts, dim=dim)


def all_reduce_min(values: list[int]) -> list[int]:
    """Element-wise minimum of an integer list over the ranks (the cpu group): e.g. KV blocks every rank fits."""
    if tp_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group("cpu"))
    return [int(v) for v in t.tolist()]


def broadcast_header(header: list[int] | None, length: int) -> tuple[torch.Tensor, dist.Work]:
    """Start broadcasting ``length`` int64s from rank 0 (``header`` there, None elsewhere) on the cpu group;
    returns (the tensor, the pending work)."""
    t = (torch.tensor(header, dtype=torch.int64) if header is not None
         else torch.empty(length, dtype=torch.int64))
    return t, dist.broadcast(t, src=0, group=group("cpu"), async_op=True)


def broadcast_payload(data: bytes | None, size: int) -> tuple[torch.Tensor, dist.Work]:
    """Start broadcasting ``size`` raw bytes from rank 0 (``data`` there, None elsewhere) as a uint8 tensor on the
    cpu group; returns (the tensor, the pending work). Bytes only: nothing is pickled."""
    t = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if data is not None
         else torch.empty(size, dtype=torch.uint8))
    return t, dist.broadcast(t, src=0, group=group("cpu"), async_op=True)
