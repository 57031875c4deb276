"""Tuning quantized group parameters by distillation from the float model (the last step of calibration).

GPTQ fixes each layer's integer codes by minimizing that layer's own output error; the model's error still
compounds through attention, SiLU and 30 layers. With the codes ``q`` frozen, every group's ``(scale, min)`` is
a continuous parameter of ``w = q * scale + min``, so the whole quantized model can be tuned end to end: the
loss is the KL divergence from the float model's next-token distribution (restricted to its top-k tokens, so
the targets stay small) on calibration text, and Adam updates ``scale = scale0 * exp(a)`` and
``min = min0 + b * scale0`` (``a``, ``b`` start at 0; int8 per-channel layers have no min). This is the
"scales only" end-to-end step of EfficientQAT (Chen et al., 2024).

Gradients come from the model's own forward (:func:`model_logits`): with the plain-torch op set and outside
inference mode every op is differentiable, the paged KV cache included (a fresh scratch cache per pass, written
by ``index_copy_``, becomes part of the graph). Each quantized layer's weight is substituted by one whose
scales and mins are computed from the trainable tensors, and its method's ``apply`` dequantizes it in the
forward; no second implementation of the model exists to drift from the served one.
"""
from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastinfer.distill.losses import SparseTarget, distill_loss, kl, log_tail
from fastinfer.models.interface import CausalLM, forward_sequences, model_device, scratch_kv_cache, using_ops
from fastinfer.ops import OpSet
from fastinfer.quantization.format import QuantizedWeight

logger = logging.getLogger("fastinfer")


@functools.cache
def _torch_ops(device_type: str) -> OpSet:
    return OpSet(device_type, "torch")


def model_logits(model: CausalLM, ids: torch.Tensor, block_size: int = 16) -> torch.Tensor:
    """fp32 logits [B, T, vocab] of token ids [B, T] (every row from position 0) by the model's own forward,
    run with the plain-torch op set in a fresh scratch KV cache: differentiable in whatever tensors the model's
    weights are computed from (under ``torch.no_grad`` it is just the forward)."""
    b, t = ids.shape
    if t > model.config.max_position_embeddings:
        raise ValueError(f"{t} tokens exceed the model's {model.config.max_position_embeddings} positions")
    blocks = -(-t // block_size)
    with using_ops(model, _torch_ops(model_device(model).type)), scratch_kv_cache(model, b * blocks * block_size,
                                                                                   block_size):
        hidden = forward_sequences(model, ids, block_size)  # [B * T, hidden]
        return model.compute_logits(hidden).view(b, t, -1)


@dataclass
class TeacherTargets:
    """The float model's top-k next-token log-probabilities: ``logprobs`` fp32 / ``indices`` int64 [S, T, k]
    for ``sequences`` (S sequences of T tokens)."""
    sequences: torch.Tensor  # [S, T]
    logprobs: torch.Tensor  # [S, T, k]
    indices: torch.Tensor  # [S, T, k]


@dataclass
class TuneReport:
    steps: int
    first_loss: float
    last_loss: float
    seconds: float


def teacher_targets(model: CausalLM, sequences: Sequence[list[int]], top_k: int = 128) -> TeacherTargets:
    """Run the (float) ``model`` over equal-length ``sequences`` and keep its top-``top_k`` log-probs."""
    lengths = {len(s) for s in sequences}
    if len(lengths) != 1:
        raise ValueError(f"teacher sequences must have one length, got {sorted(lengths)}")
    ids = torch.tensor(list(sequences))  # [S, T]
    lps, idx = [], []
    with torch.no_grad():
        for row in ids:
            logp = F.log_softmax(model_logits(model, row[None]), dim=-1)[0]  # [T, V]
            top = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
            lps.append(top.values)
            idx.append(top.indices)
    return TeacherTargets(ids, torch.stack(lps), torch.stack(idx))


def coarse_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Mean KL(p || q) over the teacher's top-k tokens plus one bucket for all other tokens, from the top-k
    log-probs of teacher ``logp`` and student ``logq`` [..., k] (each normalized over the full vocabulary). The
    tail bucket matters: without it the loss is minimized by a student that puts no mass outside the top k.
    (The tuner itself uses :func:`fastinfer.distill.losses.distill_loss`, which takes the student's tail from
    its logits; this is the same divergence when only the student's top-k log-probs are known.)"""
    def with_tail(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, log_tail(x)[..., None]], dim=-1)

    return kl(with_tail(logp), with_tail(logq)).mean()


class _Params:
    """The frozen codes and trainable offsets of one quantized layer."""

    def __init__(self, qw: QuantizedWeight) -> None:
        self.qw = qw
        self.scale0 = qw.scales.float()  # [N, G]
        self.min0 = None if qw.mins is None else qw.mins.float()
        self.log_scale = torch.zeros_like(self.scale0, requires_grad=True)
        self.shift = None if self.min0 is None else torch.zeros_like(self.scale0, requires_grad=True)

    def tensors(self) -> list[torch.Tensor]:
        return [self.log_scale] + ([] if self.shift is None else [self.shift])

    def scales_mins(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        scales = self.scale0 * torch.exp(self.log_scale)
        mins = None if self.min0 is None or self.shift is None else self.min0 + self.shift * self.scale0
        return scales, mins

    def substitute(self) -> QuantizedWeight:
        """The layer's weight with the current (differentiable) scales and mins, in fp32."""
        scales, mins = self.scales_mins()
        return QuantizedWeight(self.qw.bits, self.qw.group_size, self.qw.qweight, scales, mins)

    def result(self) -> QuantizedWeight:
        scales, mins = self.scales_mins()
        qw = self.qw
        return QuantizedWeight(qw.bits, qw.group_size, qw.qweight, scales.detach().to(qw.scales.dtype),
                               None if mins is None or qw.mins is None else mins.detach().to(qw.mins.dtype))


def tune_group_params(model: CausalLM, targets: TeacherTargets, steps: int = 16, batch_size: int = 2,
                      lr: float = 3e-4, skip: tuple[str, ...] = ("lm_head",)) -> TuneReport:
    """Tune the (scale, min) of every quantized projection of ``model`` (codes frozen) for ``steps`` Adam steps
    of ``batch_size`` sequences from ``targets``, cycling through them; writes the result into the layers.

    Layers named in ``skip`` keep their parameters: by default the lm_head, whose one scale per vocabulary row
    would otherwise be fitted to the tokens that happen to occur in the calibration text."""
    if steps < 0 or batch_size < 1:
        raise ValueError("steps must be >= 0 and batch_size >= 1")
    params = {m: _Params(m.quant) for name, m in model.quantizable_layers().items()
              if m.quant is not None and name not in skip}
    if not params:
        raise ValueError("tune_group_params needs a quantized model")

    opt = torch.optim.Adam([t for p in params.values() for t in p.tensors()], lr=lr)
    s = targets.sequences.shape[0]
    losses: list[float] = []
    start = time.perf_counter()
    try:
        for step in range(steps):
            rows = torch.tensor([(step * batch_size + i) % s for i in range(batch_size)])
            for layer, p in params.items():
                layer.quant = p.substitute()  # the forward reads the weight through the trainable tensors
            logits = model_logits(model, targets.sequences[rows])  # [B, T, V]
            loss = distill_loss(logits, SparseTarget(targets.indices[rows], targets.logprobs[rows]), "fkl")
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            logger.debug("quant tune step %d: KL %.4f", step, losses[-1])
    finally:
        for layer, p in params.items():
            layer.quant = p.qw
    for layer, p in params.items():
        layer.set_quantized(p.result(), layer.quant_method)
    report = TuneReport(steps, losses[0] if losses else 0.0, losses[-1] if losses else 0.0,
                        time.perf_counter() - start)
    logger.info("tuned the group scales of %d layers: %d steps, KL %.4f -> %.4f (%.0f s)", len(params), steps,
                report.first_loss, report.last_loss, report.seconds)
    return report
