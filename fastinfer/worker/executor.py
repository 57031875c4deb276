"""The engine's executor: the in-process :class:`Worker` for one device, or :class:`MultiprocExecutor` for
tensor parallelism (rank 0 in the engine's process, ranks 1..N-1 in spawned processes or started by torchrun).

Each call the engine makes is one command (:mod:`fastinfer.worker.tp_worker`): rank 0 broadcasts the step's
plan as JSON bytes and every rank runs the same forward; the logits are all-gathered, so every rank samples
the same tokens from the same logits with the same seeded generator, and only rank 0's
:class:`ModelRunnerOutput` is returned. Calls that need no collective (grammar checks and compiles, expert
counters) run on rank 0 alone; the workers compile a request's grammar when they first see it.

Faults: any failure of a command is fatal (:class:`ExecutorFailed`, the ranks may no longer agree): a rank that
exits is named with its exit code, a collective that does not finish within ``distributed_timeout_s`` fails;
while idle a heartbeat every quarter timeout keeps the workers' waits short and notices a dead rank.
``shutdown`` (also at garbage collection and interpreter exit) stops every worker, killing those that do not
exit in time."""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import socket
import threading
import time
import weakref
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import torch

from fastinfer.config import EngineConfig
from fastinfer.core.outputs import ModelRunnerOutput, SchedulerOutput
from fastinfer.core.serialization import encode_scheduler_output
from fastinfer.distributed import ExecutorFailed, parallel_state
from fastinfer.distributed.communication import broadcast_header, broadcast_payload
from fastinfer.sampling_params import StructuredOutputsParams
from fastinfer.worker import tp_worker
from fastinfer.worker.worker import Worker

logger = logging.getLogger("fastinfer")


def make_executor(config: EngineConfig) -> Worker | MultiprocExecutor:
    """The executor for ``config``: the worker itself for one device. Under torchrun, ranks > 0 run their
    worker loop here and exit when rank 0 shuts down."""
    if parallel_state.tp_size() > 1:  # the rank and groups are per process
        raise ValueError("a tensor-parallel engine is already running in this process: with tensor parallelism, "
                         "one engine per process (shut the other down first)")
    if config.tensor_parallel_size == 1:
        return Worker(config)
    if tp_worker.launched_by_torchrun() and tp_worker.torchrun_rank(config) != 0:
        tp_worker.main(config)  # never returns
    return MultiprocExecutor(config)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _reap(procs: list[BaseProcess], state: dict[str, bool]) -> None:
    """Stop every rank: unless a rank failed, tell them all to exit (torchrun's ranks too) and give spawned ones 5 s
    to do so; then SIGTERM, SIGKILL what is left and leave the process groups."""
    if not state["failed"] and state["joined"]:
        try:
            broadcast_header([tp_worker.SHUTDOWN, 0], 2)[1].wait()
        except Exception as e:  # a rank already gone
            logger.warning("tensor parallelism: shutdown message failed (%s)", e)
        deadline = time.monotonic() + 5.0
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(2.0)
        if p.is_alive():
            p.kill()
            p.join(2.0)
    parallel_state.destroy()


class MultiprocExecutor:
    """Rank 0 of ``config.tensor_parallel_size`` ranks, with the methods the engine calls on a Worker."""

    def __init__(self, config: EngineConfig) -> None:
        tp = config.tensor_parallel_size
        self.timeout_s = float(config.distributed_timeout_s)
        self._lock = threading.Lock()
        self._failed: str | None = None
        self._closed = False
        self._procs: list[BaseProcess] = []
        self._conns: list[Connection] = []
        self._errors: dict[int, str] = {}
        if tp_worker.launched_by_torchrun():
            init_method = "env://"
        else:
            init_method = f"tcp://127.0.0.1:{_free_port()}"
            self._spawn(config, init_method)
        self._state = {"failed": False, "joined": False}
        self._finalizer = weakref.finalize(self, _reap, self._procs, self._state)  # also at interpreter exit
        parallel_state.set_tensor_parallel(0, tp)
        try:
            self.worker = Worker(config, join=lambda backend: self._join(backend, init_method))
        except BaseException as e:
            reason = self._dead_rank()
            self._state["failed"] = True  # the ranks may be inside a start-up collective: stop them, say nothing
            self._finalizer()
            if reason is not None:
                raise ExecutorFailed(f"tensor parallelism failed to start: {reason}") from e
            raise
        self.info, self.tokenizer, self.model_config = self.worker.info, self.worker.tokenizer, self.worker.model_config
        self._last_command = time.monotonic()
        threading.Thread(target=_heartbeat, args=(weakref.ref(self), self.timeout_s / 4), daemon=True,
                         name="fastinfer-tp-heartbeat").start()
        logger.info("tensor parallelism: %d ranks (%s), worker pids %s", tp, init_method, self.worker_pids())

    # -- the engine's calls ---------------------------------------------------------------------------------
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self._command(tp_worker.EXECUTE, encode_scheduler_output(sched), lambda: self.worker.execute(sched))

    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        ids = [int(t) for t in token_ids]
        return self._command(tp_worker.PROMPT_LOGITS, json.dumps(ids).encode(), lambda: self.worker.prompt_logits(ids))

    def check_grammar(self, params: StructuredOutputsParams) -> None:
        self.worker.check_grammar(params)

    def compile_grammar(self, params: StructuredOutputsParams) -> None:
        self.worker.compile_grammar(params)

    def expert_load(self) -> dict[int, list[int]]:
        return self.worker.expert_load()

    def decode_graph_runs(self) -> int:
        return self.worker.decode_graph_runs()

    def worker_pids(self) -> list[int]:
        """Process ids of the spawned ranks 1..N-1 (empty under torchrun)."""
        return [p.pid for p in self._procs if p.pid is not None]

    def check_health(self) -> None:
        """Raise :class:`ExecutorFailed` when a rank has failed (or a worker process has exited)."""
        if self._failed is None and not self._closed:
            reason = self._dead_rank()
            if reason is not None:
                self._fail(reason)
        if self._failed is not None:
            raise ExecutorFailed(self._failed)

    def shutdown(self) -> None:
        """Tell every rank to stop, then join them (killing those that do not exit in time)."""
        got = self._lock.acquire(timeout=self.timeout_s)  # let a running command finish
        try:
            self._closed = True
            if not got:
                self._state["failed"] = True  # a command is stuck: do not wait for the ranks
            self._finalizer()
        finally:
            if got:
                self._lock.release()

    # -- commands -------------------------------------------------------------------------------------------
    def _command(self, cmd: int, payload: bytes, local: Any) -> Any:
        with self._lock:
            self._raise_if_unusable()
            try:
                self._send(cmd, payload)
                return local()
            except Exception as e:
                time.sleep(0.2)  # a rank that died mid-collective: let its exit status land first
                reason = self._dead_rank() or (f"a tensor-parallel step failed on rank 0, or one of its collectives "
                                               f"did not finish within {self.timeout_s:g} s ({type(e).__name__}: {e})")
                self._fail(reason)
                raise ExecutorFailed(reason) from e

    def _send(self, cmd: int, payload: bytes) -> None:
        reason = self._dead_rank()
        if reason is not None:
            raise ExecutorFailed(reason)
        _, work = broadcast_header([cmd, len(payload)], 2)
        work.wait()
        if payload:
            _, work = broadcast_payload(payload, len(payload))
            work.wait()
        self._last_command = time.monotonic()

    def _heartbeat(self) -> None:
        """Called by the heartbeat thread: a no-op command when nothing was sent for a while."""
        if self._failed is not None or self._closed or not self._lock.acquire(blocking=False):
            return
        try:
            if time.monotonic() - self._last_command >= self.timeout_s / 4 and not self._closed:
                self._send(tp_worker.NOOP, b"")
        except Exception as e:
            self._fail(self._dead_rank() or f"tensor-parallel heartbeat failed ({type(e).__name__}: {e})")
        finally:
            self._lock.release()

    def _raise_if_unusable(self) -> None:
        if self._failed is not None:
            raise ExecutorFailed(self._failed)
        if self._closed:
            raise ExecutorFailed("the tensor-parallel executor was shut down")

    def _fail(self, reason: str) -> None:
        self._state["failed"] = True
        if self._failed is None:
            self._failed = reason
            logger.error("tensor parallelism failed: %s; stopping every rank", reason)
        self._closed = True
        for p in self._procs:  # the ranks can no longer agree: stop them now (shutdown / GC joins them)
            if p.is_alive():
                p.kill()

    def _dead_rank(self) -> str | None:
        """'tensor-parallel worker rank R exited with code C' (and its error) for the first exited worker."""
        for rank, (p, conn) in enumerate(zip(self._procs, self._conns), start=1):
            if p.exitcode is not None or not p.is_alive():
                why = self._errors.get(rank) or self._read_error(rank, conn)
                return (f"tensor-parallel worker rank {rank} (pid {p.pid}) exited with code {p.exitcode}"
                        + (f": {why}" if why else ""))
        return None

    def _read_error(self, rank: int, conn: Connection) -> str:
        try:
            while conn.poll():
                msg = conn.recv_bytes().decode(errors="replace")
                if msg != "ok":
                    self._errors[rank] = msg
        except (OSError, EOFError):
            pass
        return self._errors.get(rank, "")

    # -- start-up -------------------------------------------------------------------------------------------
    def _spawn(self, config: EngineConfig, init_method: str) -> None:
        ctx = mp.get_context("spawn")
        main = threading.current_thread() is threading.main_thread()
        for rank in range(1, config.tensor_parallel_size):
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=tp_worker.spawned_main, args=(config, rank, init_method, send, main),
                            name=f"fastinfer-tp-rank{rank}", daemon=True)
            p.start()
            send.close()
            self._procs.append(p)
            self._conns.append(recv)

    def _join(self, backend: str, init_method: str) -> None:
        """Wait until every spawned rank has loaded its shards (or name the one that failed), then join."""
        deadline = time.monotonic() + tp_worker.STARTUP_TIMEOUT_S
        pending = set(range(len(self._procs)))
        while pending:
            for i in sorted(pending):
                conn = self._conns[i]
                if conn.poll():
                    msg = conn.recv_bytes().decode(errors="replace")
                    if msg != "ok":
                        self._errors[i + 1] = msg
                        raise ExecutorFailed(f"tensor-parallel worker rank {i + 1} failed: {msg}")
                    pending.discard(i)
            reason = self._dead_rank()
            if reason is not None:
                raise ExecutorFailed(reason)
            if time.monotonic() > deadline:
                raise ExecutorFailed(f"tensor-parallel workers {sorted(r + 1 for r in pending)} did not load "
                                     f"within {tp_worker.STARTUP_TIMEOUT_S:g} s")
            time.sleep(0.05)
        parallel_state.init_groups(backend, init_method, self.timeout_s, tp_worker.STARTUP_TIMEOUT_S)
        self._state["joined"] = True


def _heartbeat(ref: weakref.ref[MultiprocExecutor], interval: float) -> None:
    """The executor's heartbeat loop; holds only a weak reference, so the executor can be collected."""
    while True:
        time.sleep(interval)
        ex = ref()
        if ex is None or ex._closed:
            return
        ex._heartbeat()
        del ex
