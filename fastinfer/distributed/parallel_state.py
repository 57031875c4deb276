"""This process's rank in the tensor-parallel group and the process groups.

The rank and size are set before the model is built (:func:`set_tensor_parallel`; the layers read them to size
their shards), the groups after every rank has loaded its shards (:func:`init_groups`), so the slow load is not
bounded by the step timeout. Two groups: ``device`` (NCCL on CUDA, gloo on the CPU) for the model's collectives
and ``cpu`` (gloo) for the executor's control messages. Without a group (``tensor_parallel_size == 1``) the rank
is 0 of 1 and no collective is ever called."""
from __future__ import annotations

import datetime
import logging

import torch.distributed as dist

logger = logging.getLogger("fastinfer")

_rank, _size = 0, 1
_groups: dict[str, dist.ProcessGroup] = {}


def set_tensor_parallel(rank: int, size: int) -> None:
    """Declare this process rank ``rank`` of ``size`` (before building the model)."""
    global _rank, _size
    if not 0 <= rank < size:
        raise ValueError(f"tensor-parallel rank {rank} is not in [0, {size})")
    _rank, _size = rank, size


def tp_rank() -> int:
    return _rank


def tp_size() -> int:
    return _size


def init_groups(backend: str, init_method: str, timeout_s: float, startup_timeout_s: float) -> None:
    """Join the default group (rendezvous bounded by ``startup_timeout_s``) and create the device and cpu
    groups, whose every collective is bounded by ``timeout_s``."""
    if dist.is_initialized():
        raise RuntimeError("a torch.distributed process group already exists in this process: one "
                           "tensor-parallel engine per process")
    dist.init_process_group(backend, init_method=init_method, rank=_rank, world_size=_size,
                            timeout=datetime.timedelta(seconds=startup_timeout_s))
    timeout = datetime.timedelta(seconds=timeout_s)
    _groups["device"] = dist.new_group(list(range(_size)), timeout=timeout, backend=backend)
    _groups["cpu"] = (_groups["device"] if backend == "gloo"
                      else dist.new_group(list(range(_size)), timeout=timeout, backend="gloo"))
    logger.info("tensor parallel: rank %d of %d joined (%s, collective timeout %.0f s)", _rank, _size, backend,
                timeout_s)


def group(kind: str = "device") -> dist.ProcessGroup:
    if kind not in _groups:
        raise RuntimeError("no tensor-parallel process group in this process (init_groups was not called)")
    return _groups[kind]


def destroy() -> None:
    """Leave the groups (best effort: a peer may be gone) and return to rank 0 of 1."""
    global _rank, _size
    _groups.clear()
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:  # a dead peer: nothing more to tear down here
            logger.debug("destroy_process_group: %s", e)
    _rank, _size = 0, 1
