"""Distillation losses between a teacher's and a student's next-token distributions, in log space.

Every loss is computed over *buckets*: with a full teacher (logits [N, V]) the buckets are the V tokens; with a
sparse teacher (:class:`SparseTarget`: its top-k token ids and log-probabilities over the full vocabulary, as
the engine returns them) they are the k tokens plus one *tail* bucket holding the rest of the mass
(``1 - sum(p_topk)``, at least 1e-12: see :func:`log_tail`), and the student's probabilities are aggregated the
same way (its log-prob of each top-k token, and the log-sum-exp of all its other logits). The tail matters:
without it a student that puts no mass outside the teacher's top k would be optimal. When ``k`` covers the
vocabulary there is no tail and the sparse loss equals the full one.

Divergences (``P`` the teacher, ``Q`` the student, per position):

* ``fkl``: forward KL, ``KL(P || Q) = sum P log(P / Q)`` (mass-covering; the usual distillation loss);
* ``rkl``: reverse KL, ``KL(Q || P)`` (mode-seeking);
* ``jsd``: the generalised Jensen-Shannon divergence of GKD (Agarwal et al., 2024),
  ``JSD(beta) = beta KL(P || M) + (1 - beta) KL(Q || M)`` with ``M = beta P + (1 - beta) Q`` (TRL's
  ``GKDTrainer`` uses the same mixture), **divided by beta (1 - beta)**: the paper's JSD(beta) tends to 0 at
  both ends, the normalised one is continuous on [0, 1] and equals forward KL at ``beta = 0`` and reverse KL
  at ``beta = 1`` (its limits), ``4 JS(P, Q)`` at 0.5;
* ``tv``: total variation, ``0.5 sum |P - Q|``.

``temperature`` divides both sides' logits. A sparse teacher has no logits, so its temperature applies to its
k + 1 buckets (the tail tempered as if it were one token): exact when there is no tail, an approximation
otherwise; the student's tempered distribution is exact. The loss is not multiplied by ``temperature ** 2``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSSES = ("fkl", "rkl", "jsd", "tv")


@dataclass(frozen=True)
class SparseTarget:
    """A sparse teacher: ``ids`` int64 [..., k] (distinct per position) and ``logprobs`` [..., k], the teacher's
    log-probabilities of those tokens normalised over the full vocabulary."""
    ids: torch.Tensor
    logprobs: torch.Tensor

    def __post_init__(self) -> None:
        if self.ids.shape != self.logprobs.shape:
            raise ValueError(f"SparseTarget ids {tuple(self.ids.shape)} and logprobs {tuple(self.logprobs.shape)} "
                             "differ in shape")


Teacher = torch.Tensor | SparseTarget


def _wide(x: torch.Tensor) -> torch.Tensor:
    """fp32 for half types; fp32 / fp64 as they are (gradient checks run in fp64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def log_tail(logprobs: torch.Tensor, floor: float = 1e-12) -> torch.Tensor:
    """``log(1 - sum(exp(logprobs)))`` over the last dim: the log-mass outside a top-k set, at least
    ``log(floor)``. The true tail of a softmax over more than k tokens is positive, but the sum of k rounded
    probabilities can reach 1; the floor keeps the log finite (and reverse KL finite) there."""
    lse = torch.logsumexp(logprobs, dim=-1).clamp(max=0.0)
    return (-torch.expm1(lse)).clamp(min=floor).log()


def buckets(student_logits: torch.Tensor, teacher: Teacher, temperature: float = 1.0,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher, student) log-probabilities over the same buckets, [..., B]: the V tokens for full teacher
    logits, else the teacher's k tokens plus a tail bucket (no tail when k >= V)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logq_all = F.log_softmax(_wide(student_logits) / temperature, dim=-1)
    if isinstance(teacher, torch.Tensor):
        if teacher.shape != student_logits.shape:
            raise ValueError(f"teacher logits {tuple(teacher.shape)} and student logits "
                             f"{tuple(student_logits.shape)} differ in shape")
        return F.log_softmax(_wide(teacher) / temperature, dim=-1), logq_all
    ids, v = teacher.ids.long(), student_logits.shape[-1]
    if ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"teacher top-k {tuple(ids.shape)} does not match student logits "
                         f"{tuple(student_logits.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= v):
        raise ValueError(f"teacher token ids must be in [0, {v})")
    head_p = teacher.logprobs.to(logq_all.dtype)
    head_q = logq_all.gather(-1, ids)
    if ids.shape[-1] >= v:  # the top k is the whole vocabulary: no tail
        return F.log_softmax(head_p / temperature, dim=-1), head_q
    tail_p = log_tail(head_p)
    tail_q = torch.logsumexp(logq_all.scatter(-1, ids, -math.inf), dim=-1)  # the student's mass outside the ids
    logp = F.log_softmax(torch.cat([head_p, tail_p[..., None]], dim=-1) / temperature, dim=-1)
    return logp, torch.cat([head_q, tail_q[..., None]], dim=-1)


def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``KL(P || Q)`` over the last dim from log-probabilities; buckets with ``P = 0`` contribute 0 whatever
    ``Q`` is (and no NaN gradient)."""
    p = logp.exp()
    zero = torch.zeros_like(logp)
    return (p * (torch.where(p > 0, logp, zero) - torch.where(p > 0, logq, zero))).sum(-1)


def divergence(kind: str, logp: torch.Tensor, logq: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence of student ``logq`` from teacher ``logp`` (both [..., B]) -> [...]."""
    if kind == "fkl":
        return kl(logp, logq)
    if kind == "rkl":
        return kl(logq, logp)
    if kind == "tv":
        return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)
    if kind == "jsd":
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        if beta == 0.0:
            return kl(logp, logq)
        if beta == 1.0:
            return kl(logq, logp)
        logm = torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))
        return (beta * kl(logp, logm) + (1 - beta) * kl(logq, logm)) / (beta * (1 - beta))
    raise ValueError(f"unknown loss {kind!r}: choose from {', '.join(LOSSES)}")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.mean()
    if mask.shape != x.shape:
        raise ValueError(f"mask {tuple(mask.shape)} does not match the positions {tuple(x.shape)}")
    n = mask.sum()
    if int(n) == 0:
        raise ValueError("the mask selects no positions")
    return torch.where(mask, x, torch.zeros_like(x)).sum() / n


def distill_loss(student_logits: torch.Tensor, teacher: Teacher, kind: str = "fkl", *, beta: float = 0.5,
                 temperature: float = 1.0, mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                 alpha: float = 0.0) -> torch.Tensor:
    """Mean divergence over the positions ``mask`` selects (bool [...], e.g. completion positions only; all
    when None) of the student's logits [..., V] from the teacher's (full logits [..., V] or a
    :class:`SparseTarget`), mixed with ``alpha`` times the cross-entropy of the student (temperature 1) on
    ``labels`` (int [...]): ``(1 - alpha) * divergence + alpha * CE``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha > 0 and labels is None:
        raise ValueError("alpha > 0 mixes in cross-entropy, which needs labels")
    logp, logq = buckets(student_logits, teacher, temperature)
    loss = (1 - alpha) * _masked_mean(divergence(kind, logp, logq, beta), mask) if alpha < 1 else 0.0
    if alpha > 0:
        assert labels is not None
        if labels.shape != student_logits.shape[:-1]:
            raise ValueError(f"labels {tuple(labels.shape)} do not match the positions "
                             f"{tuple(student_logits.shape[:-1])}")
        ce = F.cross_entropy(_wide(student_logits).flatten(0, -2), labels.long().flatten(), reduction="none")
        loss = loss + alpha * _masked_mean(ce.view(labels.shape), mask)
    assert isinstance(loss, torch.Tensor)
    return loss
