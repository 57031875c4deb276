"""A training run killed after a step resumes from its last checkpoint to the same loss curve as an uninterrupted
run (CPU, float32): the data order is a function of the seed and the step, and the checkpoint holds the weights,
the AdamW state and the RNG state."""
from __future__ import annotations

import os

import pytest
import torch

from fastinfer import LLM
from fastinfer.distill import data as D
from fastinfer.distill.student import config_student, load_teacher
from fastinfer.distill.trainer import TrainConfig, Trainer, lr_at, measure_acceptance, micro_batch
from tests.distill.tiny import STUDENT, make_teacher, random_prompts


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    teacher = make_teacher(str(tmp_path_factory.mktemp("teacher")))
    student = config_student(load_teacher(teacher), STUDENT, str(tmp_path_factory.mktemp("init")), seed=1)
    llm = LLM(teacher, dtype="float32", max_model_len=128, load_progress=False)
    recs = D.generate_off_policy(llm, random_prompts(24, 6, seed=3), max_tokens=12, top_k=8, temperature=1.0,
                                 use_tqdm=False)
    return teacher, student, D.TeacherData(recs, 8, "off-policy", teacher)


CFG = TrainConfig(steps=12, lr=3e-3, warmup=3, batch_size=3, grad_accum=2, save_every=4, train_embeddings=True,
                  weight_decay=0.01)


def test_killed_run_resumes_to_the_same_loss_curve(setup, tmp_path):
    teacher, student, data = setup
    full = Trainer(student, data, str(tmp_path / "full"), CFG).run(progress=False)
    assert len(full.losses) == 12

    def kill_after_10(step: int, loss: float) -> None:
        if step == 10:
            raise Killed

    with pytest.raises(Killed):
        Trainer(student, data, str(tmp_path / "cut"), CFG).run(on_step=kill_after_10, progress=False)
    ckpts = sorted(os.listdir(tmp_path / "cut" / "checkpoints"))
    assert ckpts == ["step-000004", "step-000008"]  # keep_checkpoints=2; step 10 was never saved
    resumed = Trainer(student, data, str(tmp_path / "cut"), CFG).run(resume=True, progress=False)
    assert resumed.resumed_from == 8
    assert resumed.losses == pytest.approx(full.losses, abs=1e-6, rel=0)
    for name in ("full", "cut"):  # both final drafts are equal, and servable as drafts
        assert os.path.exists(tmp_path / name / "model.safetensors")
    from safetensors.torch import load_file
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(tmp_path / "cut" /
                                                                                  "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    ckpt = str(tmp_path / "cut" / "checkpoints" / "step-000012")
    stats = measure_acceptance(teacher, ckpt, random_prompts(2, 6, seed=5), 2, 6, dtype="float32",
                               max_model_len=128)
    assert stats["draft_tokens"] > 0


def test_a_run_without_checkpoints_starts_over_and_incomplete_checkpoints_are_ignored(setup, tmp_path):
    _, student, data = setup
    t = Trainer(student, data, str(tmp_path / "x"), CFG)
    assert t.resume() == 0
    os.makedirs(tmp_path / "x" / "checkpoints" / "step-000099")  # no trainer_state.json: incomplete
    assert t.resume() == 0


def test_resume_refuses_another_run(setup, tmp_path):
    _, student, data = setup
    cfg = TrainConfig(steps=2, batch_size=2, save_every=1, train_embeddings=True)
    Trainer(student, data, str(tmp_path / "r"), cfg).run(progress=False)
    other = TrainConfig(steps=4, batch_size=2, save_every=1, seed=7, train_embeddings=True)
    with pytest.raises(ValueError, match="other parameters or seed"):
        Trainer(student, data, str(tmp_path / "r"), other).run(resume=True, progress=False)


def test_schedule_and_data_order():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1, batch_size=4)
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 10) == pytest.approx(1.0) and lr_at(cfg, 100) == pytest.approx(0.1)
    assert lr_at(cfg, 55) == pytest.approx(0.55)  # half way down the cosine
    # every record once per epoch, the same order for the same seed, another for another seed
    epoch = [i for m in range(5) for i in micro_batch(cfg, 20, m)]
    assert sorted(epoch) == list(range(20))
    assert epoch == [i for m in range(5) for i in micro_batch(cfg, 20, m)]
    other = TrainConfig(steps=100, batch_size=4, seed=1)
    assert epoch != [i for m in range(5) for i in micro_batch(other, 20, m)]
