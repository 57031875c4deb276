"""Calibrated quantization: rotation, GPTQ, then group parameters tuned by distillation.

The recipe behind ``fastinfer quantize MODEL -q int4 --calibrate`` (and the int4 perplexity gate):

1. cut calibration text into sequences and record the float model's top-k next-token log-probs on them
   (:func:`fastinfer.quantization.tune.teacher_targets`);
2. rotate the model's hidden spaces (:func:`fastinfer.quantization.rotation.rotate_model`; the function is unchanged);
3. quantize every projection with GPTQ on the same sequences (:func:`fastinfer.quantization.gptq.gptq_quantize_model`;
   the experts of MoE models by round-to-nearest);
4. tune every group's (scale, min), codes frozen, towards the float model's distribution
   (:func:`fastinfer.quantization.tune.tune_group_params`).

Each step can be switched off (``rotate=False``, ``tune_steps=0``) to measure what it brings.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from fastinfer.models.interface import CausalLM, moe_blocks
from fastinfer.quantization.gptq import calibration_sequences, gptq_quantize_model
from fastinfer.quantization.rotation import rotate_model
from fastinfer.quantization.tune import teacher_targets, tune_group_params

logger = logging.getLogger("fastinfer")


def calibrated_quantize(model: CausalLM, tokenizer: Any, method: str = "int4", group_size: int | None = None,
                        rotate: bool = True, tune_steps: int = 24, seed: int = 0, text: str | None = None,
                        num_tokens: int = 16384, seq_len: int = 512) -> dict[str, Any]:
    """Quantize the float ``model`` in place with the recipe above; returns a description for the saved
    ``quantization_config``. ``text`` defaults to :func:`fastinfer.quantization.gptq.default_calibration_text`."""
    start = time.perf_counter()
    seqs = [s for s in calibration_sequences(tokenizer, text, num_tokens, seq_len) if len(s) == seq_len]
    if not seqs:
        raise ValueError(f"the calibration text has fewer than {seq_len} tokens")
    targets = teacher_targets(model, seqs) if tune_steps else None
    info: dict[str, Any] = {"calibration": "gptq", "calibration_tokens": len(seqs) * seq_len}
    if rotate:
        info["rotation"] = rotate_model(model, seed)
    gptq_quantize_model(model, seqs, method, group_size)
    if moe_blocks(model):  # GPTQ covers the dense projections; experts take round-to-nearest
        model.quantize(method, group_size, lm_head=None)
        info["experts"] = "round-to-nearest"
    if targets is not None:
        report = tune_group_params(model, targets, tune_steps)
        info["tuned"] = {"steps": report.steps, "kl_first": round(report.first_loss, 4),
                         "kl_last": round(report.last_loss, 4)}
    info["seconds"] = round(time.perf_counter() - start, 1)
    logger.info("calibrated %s quantization: %s", method, info)
    return info
