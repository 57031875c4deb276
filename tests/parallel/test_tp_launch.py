"""Launched by torchrun (one host, 2 ranks): every rank runs the same ``fastinfer generate`` command; rank 0
prints what one process prints, rank 1 serves its steps and exits cleanly when rank 0 shuts down."""
from __future__ import annotations

import os
import subprocess
import sys

from fastinfer import LLM, SamplingParams


def test_torchrun_two_ranks_match_one_process(tiny_model_dir):
    path = tiny_model_dir("llama")
    args = [path, "hello world", "--dtype", "float32", "--max-tokens", "8", "--max-model-len", "256"]
    ref = LLM(path, dtype="float32", max_model_len=256, load_progress=False).generate(
        "hello world", SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0].outputs[0].text
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "fastinfer.entrypoints.cli", "generate", *args, "--tensor-parallel-size", "2"],
                         capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == ref.strip()
