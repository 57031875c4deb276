"""Students: a layer subset of the teacher (all layers: the teacher itself), the transformers module the
trainer differentiates equals the engine's model on the saved directory, the projected hidden size (exact when
the stream fits), the config student as a draft; bad layer lists are clear errors."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from fastinfer import LLM, SamplingParams
from fastinfer.distill.student import (
    config_student,
    layer_student,
    layers_every,
    load_teacher,
    save_student,
    student_size,
    training_module,
)
from tests.distill.tiny import STUDENT, VOCAB, make_teacher

PROMPT = [2, 9, 17, 33, 5, 60, 41, 8, 12]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_teacher(str(tmp_path_factory.mktemp("teacher")), layer_scale=0.3)


def _logits(model_dir: str) -> torch.Tensor:
    return LLM(model_dir, dtype="float32", max_model_len=64, load_progress=False).prompt_logits(
        {"prompt_token_ids": PROMPT})


def _hf_logits(model_dir: str) -> torch.Tensor:
    with torch.no_grad():
        return training_module(model_dir)(torch.tensor([PROMPT])).logits[0]


def test_layers_every():
    assert layers_every(30, 6) == [0, 6, 12, 18, 24, 29]
    assert layers_every(30, 10) == [0, 10, 20, 29]
    assert layers_every(2, 1) == [0, 1]
    with pytest.raises(ValueError, match="k >= 1"):
        layers_every(4, 0)


def test_layer_students(teacher, tmp_path):
    weights = load_teacher(teacher)
    same = layer_student(weights, [0, 1], str(tmp_path / "all"))
    torch.testing.assert_close(_logits(same), _logits(teacher), atol=1e-5, rtol=0)  # all layers: the teacher
    one = layer_student(weights, [1], str(tmp_path / "one"))
    cfg = json.loads(Path(os.path.join(one, "config.json")).read_text())
    assert cfg["num_hidden_layers"] == 1 and cfg["vocab_size"] == VOCAB
    ours = _logits(one)
    assert not torch.allclose(ours, _logits(teacher), atol=1e-2)
    torch.testing.assert_close(ours, _hf_logits(one), atol=1e-4, rtol=1e-4)  # what trains is what serves
    assert student_size(one)["parameters"] == sum(t.numel() for n, t in weights.tensors.items()
                                                  if ".layers.0." not in n)
    for bad in ([], [1, 0], [0, 0], [2]):
        with pytest.raises(ValueError, match="distinct, increasing"):
            layer_student(weights, bad, str(tmp_path / "bad"))


def _subspace_teacher(teacher: str, out_dir: str, h: int) -> str:
    """The teacher with its residual stream confined to an h-dim subspace: the embeddings and every weight
    writing to the stream (o_proj, down_proj) projected onto it. Its norm weights are 1 (the default init)."""
    weights = load_teacher(teacher)
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(64, h, generator=g)).Q  # [H, h] orthonormal
    proj = u @ u.T
    t = {}
    for name, w in weights.tensors.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            w = proj @ w
        elif name == "model.embed_tokens.weight":
            w = w @ proj
        t[name] = w
    assert all(torch.equal(w, torch.ones_like(w)) for n, w in t.items() if n.endswith("norm.weight"))
    return save_student(t, weights.hf_config, weights.save_tokenizer, out_dir)


def test_projected_hidden_size_is_exact_when_the_stream_fits(teacher, tmp_path):
    """A stream that lives in an h-dim subspace loses nothing when projected to h dims (the basis comes from
    the embedding table, the norms are rescaled for the shorter vector): the student equals the teacher."""
    sub = _subspace_teacher(teacher, str(tmp_path / "sub"), 32)
    small = layer_student(load_teacher(sub), [0, 1], str(tmp_path / "proj"), hidden_size=32)
    assert json.loads(Path(os.path.join(small, "config.json")).read_text())["hidden_size"] == 32
    assert student_size(small)["parameters"] < student_size(sub)["parameters"]
    ours = _logits(small)
    torch.testing.assert_close(ours, _logits(sub), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(ours, _hf_logits(small), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="projected hidden size"):
        layer_student(load_teacher(sub), [0], str(tmp_path / "h"), hidden_size=128)


def test_config_student_loads_as_a_draft(teacher, tmp_path):
    weights = load_teacher(teacher)
    student = config_student(weights, STUDENT, str(tmp_path / "cfg"))
    cfg = json.loads(Path(os.path.join(student, "config.json")).read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (1, 32, VOCAB)
    torch.testing.assert_close(_logits(student), _hf_logits(student), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="vocabulary"):
        config_student(weights, {"vocab_size": 10}, str(tmp_path / "v"))
    llm = LLM(teacher, dtype="float32", max_model_len=64, load_progress=False,
              speculative_config={"method": "draft_model", "model": student, "num_speculative_tokens": 2,
                                  "cost_aware": False})
    out = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 8 and llm.engine.spec_summary()["draft_tokens"] > 0
