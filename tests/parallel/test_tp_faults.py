"""A tensor-parallel rank that dies or hangs fails the engine with a clear error within the timeout, and no
worker process outlives the engine."""
from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
from starlette.testclient import TestClient

from fastinfer import SamplingParams
from fastinfer.distributed import ExecutorFailed
from fastinfer.entrypoints.openai_server import ServerConfig, build_app

TIMEOUT_S = 5


def _run_until_failure(llm) -> float:
    """Step a long request; returns the seconds from the fault until the engine raised."""
    eng = llm.engine
    eng.add_request("r", "the quick brown fox", SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
    for _ in range(3):
        eng.step()
    return time.monotonic()


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_dead_or_hung_rank_fails_the_engine_within_the_timeout(tiny_llm, fault):
    llm = tiny_llm("llama", tensor_parallel_size=2, distributed_timeout_s=TIMEOUT_S)
    (pid,) = llm.worker_pids()
    with TestClient(build_app(llm.engine, ServerConfig(served_model_name="tiny"))) as client:
        assert client.get("/health").status_code == 200
    t0 = _run_until_failure(llm)
    os.kill(pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
    want = r"rank 1 \(pid \d+\) exited with code -9" if fault == "kill" else rf"did not finish within {TIMEOUT_S} s"
    with pytest.raises(ExecutorFailed, match=want):
        while True:
            llm.engine.step()
    assert time.monotonic() - t0 < TIMEOUT_S + 3
    with pytest.raises(ExecutorFailed):  # the engine stays failed: health reports it, later steps raise
        llm.engine.check_health()
    with TestClient(build_app(llm.engine, ServerConfig(served_model_name="tiny"))) as client:
        assert client.get("/health").status_code == 503
    llm.shutdown()
    assert not _spawned_children()


def test_worker_load_error_is_reported_and_nothing_is_left(tiny_model_dir):
    from fastinfer import LLM

    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide num_attention_heads=4; valid "
                                         "sizes: 1, 2, 4"):
        LLM(tiny_model_dir("llama"), tensor_parallel_size=3, dtype="float32", load_progress=False)
    assert not _spawned_children()


def _spawned_children() -> list[psutil.Process]:
    """Live processes this test process spawned as workers (multiprocessing's resource tracker excluded)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "spawn_main" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out
