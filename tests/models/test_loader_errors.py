"""Damaged or unsupported checkpoints fail with a clear ValueError, never a crash."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from fastinfer import LLM
from fastinfer.models.loader import load_model, resolve_model_path


@pytest.mark.parametrize("keep", [0, 100, 4096, 5_000_000])
def test_truncated_gguf(tmp_path, smollm2_path, keep):
    bad = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as src:
        bad.write_bytes(src.read(keep))
    with pytest.raises(ValueError, match="GGUF"):
        load_model(str(bad), progress=False)


def test_garbage_gguf(tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(2000))
    with pytest.raises(ValueError, match="GGUF"):
        load_model(str(bad), progress=False)


def _copy_model(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def test_truncated_safetensors(tmp_path, tiny_model_dir):
    d = _copy_model(tiny_model_dir("llama"), tmp_path / "m")
    f = os.path.join(d, "model.safetensors")
    with open(f, "rb") as fh:
        data = fh.read()
    with open(f, "wb") as fh:
        fh.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="safetensors"):
        load_model(d, progress=False)


def test_corrupt_safetensors_header(tmp_path, tiny_model_dir):
    d = _copy_model(tiny_model_dir("llama"), tmp_path / "m")
    f = os.path.join(d, "model.safetensors")
    with open(f, "rb") as fh:
        data = bytearray(fh.read())
    data[8:40] = b"{not json at all!!!!!!!!!!!!!!!}"
    with open(f, "wb") as fh:
        fh.write(bytes(data))
    with pytest.raises(ValueError, match="safetensors"):
        load_model(d, progress=False)


def test_unknown_architecture_names_supported_ones(tmp_path, tiny_model_dir):
    d = _copy_model(tiny_model_dir("llama"), tmp_path / "m")
    cfg_path = os.path.join(d, "config.json")
    with open(cfg_path) as fh:
        cfg = json.load(fh)
    cfg["architectures"] = ["NoSuchForCausalLM"]  # neither native nor known to transformers
    with open(cfg_path, "w") as fh:
        json.dump(cfg, fh)
    with pytest.raises(ValueError, match="LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        load_model(d, progress=False)


def test_missing_weights_and_bad_paths(tmp_path, tiny_model_dir):
    d = _copy_model(tiny_model_dir("llama"), tmp_path / "m")
    os.remove(os.path.join(d, "model.safetensors"))
    with pytest.raises(ValueError, match="safetensors"):
        load_model(d, progress=False)
    with pytest.raises(ValueError, match="not a known short name"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(TypeError, match="unknown engine arguments"):
        LLM(tiny_model_dir("llama"), not_an_arg=1)


def test_max_model_len_beyond_model_context(tiny_model_dir):
    with pytest.raises(ValueError, match="exceeds the model's context length"):
        LLM(tiny_model_dir("llama"), max_model_len=100_000, load_progress=False)
