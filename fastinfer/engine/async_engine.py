"""An asyncio front for ``LLMEngine``: the step loop runs in one thread beside the event loop (torch releases
the GIL in its ops, so the event loop stays responsive); requests from any number of connections join the same
running batch. Each request gets an ``asyncio.Queue`` of ``RequestOutput`` snapshots.

Which thread steps matters on CPU. Every thread that runs torch ops gets its own OpenMP team, and libgomp
stops spin-waiting (it sleeps and is woken per parallel region) once the process has more OpenMP threads than
CPUs. So when the model was built, and warmed up, in the main thread, stepping it from a second thread leaves
an idle team behind and makes every op pay a futex wake-up: measured 0.072 -> 0.095 s per decode step of 16
sequences on 2 cores. ``fastinfer serve`` therefore runs the step loop in the main thread (``thread=False``,
then :meth:`AsyncLLMEngine.run`) and the HTTP server in a thread of its own; the default (``thread=True``)
starts a background stepping thread, for in-process servers and tests."""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastinfer.engine.llm_engine import LLMEngine, PromptType
from fastinfer.outputs import RequestOutput
from fastinfer.sampling_params import SamplingParams

logger = logging.getLogger("fastinfer")


class QueueFullError(RuntimeError):
    """More requests are waiting than the server admits."""


class EngineDeadError(RuntimeError):
    """The engine is shutting down or its loop stopped."""


@dataclass
class _Stream:
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop

    def put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def _deliver(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for q, out in items:
        q.put_nowait(out)


class AsyncLLMEngine:
    """Thread-owned engine. ``max_pending`` bounds requests in flight beyond ``max_num_seqs``. With
    ``thread=False`` nothing steps until the owner calls :meth:`run` (in the thread that built the model)."""

    def __init__(self, engine: LLMEngine, max_pending: int = 256, *, thread: bool = True) -> None:
        self.engine = engine
        self.max_in_flight = engine.config.max_num_seqs + max_pending
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.accepting = True
        self.stats_lock = threading.Lock()
        self.last_step_time = time.monotonic()
        self._thread: threading.Thread | None = None
        if thread:
            self._thread = threading.Thread(target=self.run, name="fastinfer-engine", daemon=True)
            self._thread.start()

    # -- called from the event loop --------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        """Steps, or will: false once :meth:`stop` is called or the loop has ended."""
        return not self._stop.is_set()

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams) -> asyncio.Queue:
        """Queue a request; outputs (or a ValueError for bad input) arrive on the returned queue."""
        if not self.accepting or self._stop.is_set():
            raise EngineDeadError("the server is shutting down")
        with self._lock:
            if len(self._streams) >= self.max_in_flight:
                raise QueueFullError(f"too many requests in flight ({len(self._streams)}); retry later")
            if request_id in self._streams:
                raise ValueError(f"duplicate request id {request_id!r}")
            stream = _Stream(asyncio.Queue(), asyncio.get_running_loop())
            self._streams[request_id] = stream
        self._cmds.put(("add", request_id, prompt, params))
        self._wake.set()
        return stream.queue

    def abort(self, request_id: str) -> None:
        """Abort (e.g. the client went away); the KV blocks are freed on the engine thread."""
        with self._lock:
            self._streams.pop(request_id, None)
        self._cmds.put(("abort", request_id))
        self._wake.set()

    async def generate(self, request_id: str, prompt: PromptType, params: SamplingParams,
                       ) -> AsyncIterator[RequestOutput]:
        """Yield output snapshots until the final one; aborts the request if the consumer stops early."""
        q = self.add_request(request_id, prompt, params)
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def stop(self, timeout: float = 5.0) -> None:
        """End the step loop (what is still in flight fails with EngineDeadError); joins the background
        thread if this engine started one."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the engine thread -----------------------------------------------------------------------------
    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, prompt, params = cmd
                with self._lock:
                    stream = self._streams.get(rid)
                if stream is None:  # aborted before it started
                    continue
                try:
                    self.engine.add_request(rid, prompt, params)
                except ValueError as e:
                    with self._lock:
                        self._streams.pop(rid, None)
                    stream.put(e)
            else:
                self.engine.abort_request(cmd[1])

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """The step loop, in the calling thread: returns after :meth:`stop`, or once ``until()`` is true
        (checked at least every half second; ``fastinfer serve`` passes "the HTTP thread has ended")."""
        try:
            while not self._stop.is_set() and not (until is not None and until()):
                self._step_once()
        finally:
            self._close()

    def _step_once(self) -> None:
        self._drain_commands()
        if not self.engine.has_unfinished_requests():
            self._wake.wait(0.5)
            self._wake.clear()
            return
        try:
            with self.stats_lock:
                outputs = self.engine.step()
        except Exception as e:  # the engine already fails batches it cannot run; this is a last guard
            logger.exception("engine step crashed")
            outputs = []
            with self._lock:
                victims = list(self._streams.items())
            for rid, victim in victims:
                self.engine.abort_request(rid)
                victim.put(EngineDeadError(f"engine error: {e}"))
            with self._lock:
                self._streams.clear()
        self.last_step_time = time.monotonic()
        deliveries: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        with self._lock:
            for out in outputs:
                target = self._streams.get(out.request_id)
                if out.finished:
                    self._streams.pop(out.request_id, None)
                if target is not None:
                    deliveries.setdefault(target.loop, []).append((target.queue, out))
        for loop, items in deliveries.items():  # one wake-up of each event loop per step, not one per request
            loop.call_soon_threadsafe(_deliver, items)

    def _close(self) -> None:
        """The loop has ended (stopped, told to by ``until``, or crashed): abort whatever is left."""
        self._stop.set()
        with self._lock:
            left = list(self._streams.items())
            self._streams.clear()
        for rid, stream in left:
            self.engine.abort_request(rid)
            stream.put(EngineDeadError("the server shut down before the request finished"))
