"""A tensor-parallel rank other than 0: load this rank's shards, join the groups, then run every command rank 0
broadcasts (a step's plan, a prompt-logits pass, a heartbeat, shut down) until told to stop.

The command protocol (on the cpu group, gloo): a header of two int64 (command, payload bytes), then the payload
as a uint8 tensor: JSON, never pickle. A rank that fails exits with a non-zero code, which rank 0 reports.

Started by :class:`fastinfer.worker.executor.MultiprocExecutor` (spawn), or under ``torchrun`` by the same
command on every rank (``fastinfer serve`` and ``LLM(...)`` run this loop on ranks > 0)."""
from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection

from fastinfer.config import EngineConfig
from fastinfer.core.serialization import decode_scheduler_output
from fastinfer.distributed import parallel_state
from fastinfer.distributed.communication import broadcast_header, broadcast_payload

logger = logging.getLogger("fastinfer")

NOOP, EXECUTE, PROMPT_LOGITS, SHUTDOWN = 0, 1, 2, 3
STARTUP_TIMEOUT_S = 600.0  # every rank loading its shards and joining the groups


def run_rank(config: EngineConfig, rank: int, init_method: str, ready: Callable[[], None] | None = None) -> None:
    """Be rank ``rank`` (> 0) until rank 0 says shut down. ``ready`` is called once the shards are loaded."""
    from fastinfer.worker.worker import Worker

    parallel_state.set_tensor_parallel(rank, config.tensor_parallel_size)

    def join(backend: str) -> None:
        if ready is not None:
            ready()
        parallel_state.init_groups(backend, init_method, config.distributed_timeout_s, STARTUP_TIMEOUT_S)

    worker = Worker(config, join=join)
    try:
        serve(worker)
    finally:
        parallel_state.destroy()


def serve(worker: object) -> None:
    """The command loop of a rank > 0 (see the module docstring)."""
    while True:
        header, work = broadcast_header(None, 2)
        work.wait()
        cmd, size = (int(v) for v in header.tolist())
        payload = b""
        if size:
            data, work = broadcast_payload(None, size)
            work.wait()
            payload = data.numpy().tobytes()
        if cmd == SHUTDOWN:
            logger.info("tensor-parallel rank %d: shutting down", parallel_state.tp_rank())
            return
        if cmd == EXECUTE:
            worker.execute(decode_scheduler_output(payload))  # type: ignore[attr-defined]
        elif cmd == PROMPT_LOGITS:
            worker.prompt_logits(json.loads(payload))  # type: ignore[attr-defined]
        elif cmd != NOOP:
            raise RuntimeError(f"tensor-parallel rank {parallel_state.tp_rank()}: unknown command {cmd}")


def spawned_main(config: EngineConfig, rank: int, init_method: str, conn: Connection,
                 die_with_parent: bool) -> None:
    """Entry point of a process started by the executor: dies with its parent (PR_SET_PDEATHSIG, when the
    parent started it from its main thread: the signal follows the starting thread), reports "ok" once loaded
    or the error that stopped it on ``conn`` (UTF-8 text), exits non-zero on failure."""
    if die_with_parent:
        _die_with_parent()
    os.environ.setdefault("LOCAL_RANK", str(rank))
    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(levelname)s %(message)s")
    try:
        run_rank(config, rank, init_method, ready=lambda: conn.send_bytes(b"ok"))
    except BaseException as e:  # noqa: BLE001 - report whatever stopped the rank, then exit non-zero
        with contextlib.suppress(OSError):
            conn.send_bytes(f"{type(e).__name__}: {e}".encode()[:4096])
        logger.error("tensor-parallel rank %d failed: %s: %s", rank, type(e).__name__, e)
        sys.exit(1)


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the heartbeat timeout still ends the rank
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


def launched_by_torchrun() -> bool:
    """True when torchrun (torch.distributed.run) started this process (its rendezvous variables are set)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def torchrun_rank(config: EngineConfig) -> int:
    """This process's rank under torchrun; ValueError unless WORLD_SIZE equals ``tensor_parallel_size``."""
    world = int(os.environ["WORLD_SIZE"])
    if world != config.tensor_parallel_size:
        raise ValueError(f"torchrun started {world} processes but tensor_parallel_size="
                         f"{config.tensor_parallel_size}: they must be equal (one rank per process)")
    return int(os.environ["RANK"])


def main(config: EngineConfig) -> None:
    """Under torchrun: rank > 0 serves rank 0's steps and exits when rank 0 shuts down."""
    rank = torchrun_rank(config)
    if rank == 0:
        raise RuntimeError("rank 0 runs the engine, not the worker loop")
    run_rank(config, rank, "env://")
    sys.exit(0)
