"""The layer rules the architecture relies on: the engine and the entrypoints import no torch (the device
belongs to the worker), and what the scheduler hands the worker is plain data, never a live Request."""
from __future__ import annotations

import ast
import dataclasses
import pathlib
import subprocess
import sys

import fastinfer
from fastinfer.core.outputs import ModelRunnerOutput, NewRequestData, SchedulerOutput
from fastinfer.core.request import Request
from fastinfer.sampling_params import SamplingParams

ROOT = pathlib.Path(fastinfer.__file__).parent
TORCH_FREE = ("engine", "entrypoints", "core")


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_engine_entrypoints_and_core_modules_import_no_torch_themselves():
    offenders = {}
    for pkg in TORCH_FREE:
        for f in sorted((ROOT / pkg).glob("*.py")):
            bad = {m for m in _imports(f) if m == "torch" or m.startswith("torch.")}
            if bad:
                offenders[f"{pkg}/{f.name}"] = sorted(bad)
    assert not offenders, offenders


def test_the_layer_check_sees_a_torch_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from torch import nn\n    return nn\n")
    assert "torch" in _imports(f)


def test_importing_the_engine_and_entrypoints_loads_no_torch():
    code = ("import sys\n"
            "import fastinfer.engine.llm_engine, fastinfer.engine.async_engine, fastinfer.entrypoints.llm\n"
            "import fastinfer.entrypoints.cli, fastinfer.core.scheduler, fastinfer.config\n"
            "from fastinfer.config import EngineConfig\n"
            "EngineConfig(model='x', quantization='int4-g64', speculative_config={'method': 'draft_model'})\n"
            "print('torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


PLAIN = (str, int, float, bool, type(None), bytes)


def _assert_plain(value, where="out"):
    if isinstance(value, PLAIN):
        return
    if isinstance(value, (list, tuple, set, frozenset)):
        for i, v in enumerate(value):
            _assert_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            _assert_plain(k, f"{where} key")
            _assert_plain(v, f"{where}[{k!r}]")
        return
    assert isinstance(value, (SchedulerOutput, ModelRunnerOutput, NewRequestData, SamplingParams)), \
        f"{where} is a {type(value).__name__}, not plain data"
    for f in dataclasses.fields(value):
        _assert_plain(getattr(value, f.name), f"{where}.{f.name}")


def test_scheduler_output_holds_plain_data_only(tiny_llm, monkeypatch):
    llm = tiny_llm("llama", max_num_batched_tokens=16, num_kv_blocks=12, block_size=8, max_model_len=64,
                   speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    seen: list[SchedulerOutput] = []
    inner = llm.engine.worker.execute

    def spy(sched):
        seen.append(sched)
        out = inner(sched)
        _assert_plain(out, "runner output")
        return out

    monkeypatch.setattr(llm.engine.worker, "execute", spy)
    prompts = ["the cat sat on the mat and the cat sat on the mat and", "a b c a b c a b c a b c a b c"] * 2
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    assert seen and any(s.new_reqs for s in seen) and any(s.spec_token_ids for s in seen)
    assert any(s.preempted_req_ids for s in seen) and any(s.finished_req_ids for s in seen)
    for s in seen:
        _assert_plain(s)


def test_the_plain_data_check_catches_a_request():
    sched = SchedulerOutput(req_ids=["a"], num_scheduled_tokens=[1], num_computed_tokens=[0], block_ids=[([0],)])
    sched.spec_token_ids["a"] = [Request("a", [1], SamplingParams())]  # type: ignore[list-item]
    try:
        _assert_plain(sched)
    except AssertionError as e:
        assert "Request" in str(e)
    else:
        raise AssertionError("a Request inside SchedulerOutput was not caught")
