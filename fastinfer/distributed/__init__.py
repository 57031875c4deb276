"""Tensor parallelism on torch.distributed: the rank's place in the group (:mod:`.parallel_state`), the
collectives the layers and the executor use (:mod:`.communication`) and the checkpoint sharding rules
(:mod:`.sharding`). This ``__init__`` imports no torch, so the engine can name :class:`ExecutorFailed`."""
from __future__ import annotations


class ExecutorFailed(RuntimeError):
    """A tensor-parallel rank died, hung past the timeout or failed: the engine cannot continue (every later
    call raises this again). The message names the rank and what happened to it."""
