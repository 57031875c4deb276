"""``fastinfer distill``: make a student, get teacher data through the engine, train, evaluate, in one call.

Layout of ``OUT``: ``init/`` (the student before training, an HF directory), ``data/teacher.safetensors`` (the
teacher data, unless ``--data`` names a file), ``checkpoints/step-N/``, and in ``OUT`` itself the trained draft
(config.json, model.safetensors, tokenizer files) and ``distill_log.json`` (losses, evaluations).
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
from typing import Any

from fastinfer.distill import data as teacher_data
from fastinfer.distill.student import config_student, layer_student, layers_every, load_teacher, student_size
from fastinfer.distill.trainer import TrainConfig, Trainer, TrainResult, measure_acceptance

logger = logging.getLogger("fastinfer")


def make_student(teacher: str, init_dir: str, every: int | None, student_config: dict[str, Any] | None,
                 hidden_size: int | None, seed: int) -> str:
    if os.path.exists(os.path.join(init_dir, "model.safetensors")):
        logger.info("using the initial student in %s", init_dir)
        return init_dir
    weights = load_teacher(teacher)
    if student_config is not None:
        return config_student(weights, student_config, init_dir, seed)
    return layer_student(weights, layers_every(weights.num_layers, every or 6), init_dir, hidden_size)


def _llm(model: str, max_model_len: int, dtype: str) -> Any:
    from fastinfer import LLM

    return LLM(model, dtype=dtype, max_model_len=max_model_len, max_num_seqs=32, load_progress=False)


def teacher_records(a: argparse.Namespace, init_dir: str) -> teacher_data.TeacherData:
    """Load ``--data`` or ``OUT/data/teacher.safetensors`` (when present), else generate it through the engine."""
    path = a.data or os.path.join(a.out, "data", "teacher.safetensors")
    if os.path.exists(path):
        return teacher_data.load(path)
    if a.data:
        raise ValueError(f"--data {a.data}: no such file")
    prompts = teacher_data.prompts_from_file(a.prompts) if a.prompts else \
        teacher_data.builtin_prompts(a.generate, a.seed)
    max_len = a.max_prompt_len + a.max_tokens + 8
    teacher = _llm(a.teacher, max_len, a.dtype)
    ids = teacher_data.encode_prompts(teacher, prompts[:a.generate], a.max_prompt_len, a.chat)
    if a.on_policy:
        student = _llm(init_dir, max_len, a.dtype)
        temp = 1.0 if a.temperature is None else a.temperature
        recs = teacher_data.generate_on_policy(student, teacher, ids, a.max_tokens, a.top_k, temp, a.seed)
        del student
    else:
        temp = 0.0 if a.temperature is None else a.temperature
        recs = teacher_data.generate_off_policy(teacher, ids, a.max_tokens, a.top_k, temp, a.seed,
                                                score_prompt=not a.mask_prompt, ignore_eos=a.ignore_eos)
    del teacher
    gc.collect()
    data = teacher_data.TeacherData(recs, a.top_k, "on-policy" if a.on_policy else "off-policy", a.teacher)
    teacher_data.save(path, data)
    logger.info("teacher data: %d sequences, %d target positions -> %s", len(data), data.num_target_tokens(), path)
    return data


def distill(a: argparse.Namespace) -> TrainResult:
    """The whole run for the parsed ``fastinfer distill`` arguments (:func:`options.add_arguments`)."""
    if a.hidden_size is not None and a.student_config is not None:
        raise ValueError("--hidden-size projects a layer student; put hidden_size in --student-config instead")
    os.makedirs(a.out, exist_ok=True)
    init_dir = make_student(a.teacher, os.path.join(a.out, "init"), a.layers_every, a.student_config,
                            a.hidden_size, a.seed)
    data = teacher_records(a, init_dir)
    train, held = data.split(min(a.held_out, len(data) - 1), a.seed)
    cfg = TrainConfig(steps=a.steps, lr=a.lr, warmup=a.warmup, batch_size=a.batch_size, grad_accum=a.grad_accum,
                      max_len=a.max_len, loss=a.loss, beta=a.beta, temperature=a.distill_temperature, alpha=a.alpha,
                      mask_prompt=a.mask_prompt, train_embeddings=a.train_embeddings, seed=a.seed,
                      save_every=a.save_every, eval_every=a.eval_every, device=a.device)
    acceptance = None
    if a.eval_prompts:
        evp = teacher_data.builtin_prompts(a.eval_prompts, a.seed + 1)
        teacher = _llm(a.teacher, a.max_prompt_len + 8, a.dtype)
        ids = teacher_data.encode_prompts(teacher, evp, a.max_prompt_len, a.chat)
        del teacher
        gc.collect()

        def acceptance(draft_dir: str) -> float:
            return measure_acceptance(a.teacher, draft_dir, ids, a.eval_k, a.eval_max_tokens, dtype=a.dtype,
                                      max_model_len=a.max_prompt_len + a.eval_max_tokens + a.eval_k + 8,
                                      max_num_seqs=max(8, len(ids)))["acceptance_rate"]

    result = Trainer(init_dir, train, a.out, cfg, held, acceptance).run(resume=a.resume, progress=not a.quiet)
    size = student_size(a.out)
    print(json.dumps({"out": a.out, "evals": result.evals, **size}))
    return result
