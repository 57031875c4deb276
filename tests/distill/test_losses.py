"""Distillation losses against brute-force references written from the definitions (plain Python floats over
explicit buckets), gradients by finite differences (gradcheck, float64), and the edge cases."""
from __future__ import annotations

import math

import pytest
import torch

from fastinfer.distill.losses import LOSSES, SparseTarget, buckets, distill_loss

V = 11


def _softmax(xs: list[float], t: float = 1.0) -> list[float]:
    m = max(x / t for x in xs)
    e = [math.exp(x / t - m) for x in xs]
    return [x / sum(e) for x in e]


def _ref_div(kind: str, p: list[float], q: list[float], beta: float) -> float:
    def kl(a: list[float], b: list[float]) -> float:
        return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)

    if kind == "fkl":
        return kl(p, q)
    if kind == "rkl":
        return kl(q, p)
    if kind == "tv":
        return 0.5 * sum(abs(x - y) for x, y in zip(p, q))
    m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
    return (beta * kl(p, m) + (1 - beta) * kl(q, m)) / (beta * (1 - beta))


def _ref_sparse_buckets(t_logits: list[float], s_logits: list[float], k: int, temp: float,
                        ) -> tuple[list[float], list[float]]:
    """The teacher's top-k probabilities (at temperature 1, as the engine returns them) plus the tail, then
    tempered as k + 1 buckets; the student's tempered probabilities of the same ids plus the rest."""
    p = _softmax(t_logits)
    ids = sorted(range(len(p)), key=lambda i: -p[i])[:k]
    head = [p[i] for i in ids]
    pb = head + ([1 - sum(head)] if k < len(p) else [])
    pb = _softmax([math.log(x) for x in pb], temp)
    q = _softmax(s_logits, temp)
    qb = [q[i] for i in ids] + ([sum(q[i] for i in range(len(q)) if i not in ids)] if k < len(q) else [])
    return pb, qb


def _rows(n: int, seed: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(n, V, generator=g, dtype=dtype), 2 * torch.randn(n, V, generator=g, dtype=dtype))


def _sparse(teacher_logits: torch.Tensor, k: int) -> SparseTarget:
    top = torch.log_softmax(teacher_logits, -1).topk(k, -1)
    return SparseTarget(top.indices, top.values)


@pytest.mark.parametrize("kind,beta", [("fkl", 0.5), ("rkl", 0.5), ("tv", 0.5), ("jsd", 0.5), ("jsd", 0.1),
                                       ("jsd", 0.9)])
@pytest.mark.parametrize("temp", [1.0, 0.7, 2.0])
def test_full_teacher_matches_the_definition(kind, beta, temp):
    t, s = _rows(5, 0)
    got = distill_loss(s, t, kind, beta=beta, temperature=temp)
    ref = sum(_ref_div(kind, _softmax(a.tolist(), temp), _softmax(b.tolist(), temp), beta)
              for a, b in zip(t, s)) / len(t)
    assert float(got) == pytest.approx(ref, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("kind,beta", [("fkl", 0.5), ("rkl", 0.5), ("tv", 0.5), ("jsd", 0.3)])
@pytest.mark.parametrize("k", [1, 3, V - 1, V])
@pytest.mark.parametrize("temp", [1.0, 1.5])
def test_sparse_teacher_matches_the_bucket_definition(kind, beta, k, temp):
    t, s = _rows(4, 1)
    got = distill_loss(s, _sparse(t, k), kind, beta=beta, temperature=temp)
    ref = 0.0
    for a, b in zip(t, s):
        pb, qb = _ref_sparse_buckets(a.tolist(), b.tolist(), k, temp)
        ref += _ref_div(kind, pb, qb, beta) / len(t)
    assert float(got) == pytest.approx(ref, rel=1e-8, abs=1e-12)


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("temp", [1.0, 0.5])
def test_top_k_of_the_whole_vocabulary_equals_the_full_loss(kind, temp):
    t, s = _rows(6, 2)
    full = distill_loss(s, t, kind, temperature=temp)
    sparse = distill_loss(s, _sparse(t, V), kind, temperature=temp)
    torch.testing.assert_close(sparse, full, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", LOSSES)
def test_identical_distributions_give_zero(kind):
    t, _ = _rows(3, 3)
    assert float(distill_loss(t, t, kind)) == pytest.approx(0.0, abs=1e-12)
    sparse = _sparse(t, 4)
    # the student equal to the teacher also matches its top-k + tail buckets exactly
    assert float(distill_loss(t, sparse, kind)) == pytest.approx(0.0, abs=1e-9)


def test_jsd_limits_and_midpoint():
    t, s = _rows(4, 4)
    fkl, rkl = distill_loss(s, t, "fkl"), distill_loss(s, t, "rkl")
    assert float(distill_loss(s, t, "jsd", beta=0.0)) == pytest.approx(float(fkl), rel=1e-12)
    assert float(distill_loss(s, t, "jsd", beta=1.0)) == pytest.approx(float(rkl), rel=1e-12)
    # continuous at the ends (the normalised JSD's limits are forward and reverse KL)
    assert float(distill_loss(s, t, "jsd", beta=1e-6)) == pytest.approx(float(fkl), rel=1e-4)
    assert float(distill_loss(s, t, "jsd", beta=1 - 1e-6)) == pytest.approx(float(rkl), rel=1e-4)
    # beta = 0.5 is 4 x the classic Jensen-Shannon divergence
    js = 0.0
    for a, b in zip(t, s):
        p, q = _softmax(a.tolist()), _softmax(b.tolist())
        m = [(x + y) / 2 for x, y in zip(p, q)]
        js += 0.5 * sum(x * math.log(x / z) for x, z in zip(p, m)) + 0.5 * sum(
            y * math.log(y / z) for y, z in zip(q, m))
    assert float(distill_loss(s, t, "jsd", beta=0.5)) == pytest.approx(4 * js / len(t), rel=1e-9)


def test_mask_and_cross_entropy_mix():
    t, s = _rows(6, 5)
    t, s = t.view(2, 3, V), s.view(2, 3, V)
    mask = torch.tensor([[False, True, True], [False, False, True]])
    per = torch.stack([distill_loss(s[i, j], t[i, j], "fkl") for i in range(2) for j in range(3)]).view(2, 3)
    got = distill_loss(s, t, "fkl", mask=mask)
    assert float(got) == pytest.approx(float(per[mask].mean()), rel=1e-12)
    labels = torch.tensor([[1, 2, 3], [4, 5, 6]])
    ce = -torch.log_softmax(s, -1).gather(-1, labels[..., None])[..., 0]
    mixed = distill_loss(s, t, "fkl", mask=mask, labels=labels, alpha=0.25)
    assert float(mixed) == pytest.approx(0.75 * float(per[mask].mean()) + 0.25 * float(ce[mask].mean()), rel=1e-12)
    # masked-out positions do not move the loss
    s2 = s.clone()
    s2[0, 0] += 10
    assert float(distill_loss(s2, t, "fkl", mask=mask, labels=labels, alpha=0.25)) == pytest.approx(float(mixed))


@pytest.mark.parametrize("kind,beta", [("fkl", 0.5), ("rkl", 0.5), ("tv", 0.5), ("jsd", 0.5), ("jsd", 0.2)])
@pytest.mark.parametrize("sparse_k", [None, 3])
def test_gradients(kind, beta, sparse_k):
    t, s = _rows(3, 6)
    teacher = t if sparse_k is None else _sparse(t, sparse_k)
    mask = torch.tensor([True, False, True])
    labels = torch.tensor([0, 4, 7])
    s = s.clone().requires_grad_(True)

    def f(x):
        return distill_loss(x, teacher, kind, beta=beta, temperature=1.3, mask=mask, labels=labels, alpha=0.2)

    assert torch.autograd.gradcheck(f, (s,), eps=1e-6, atol=1e-6)
    if sparse_k is None:  # the full teacher's logits get gradients too (e.g. for on-policy co-training)
        tt = t.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda x: distill_loss(s.detach(), x, kind, beta=beta), (tt,), eps=1e-6,
                                        atol=1e-6)


def test_peaked_sparse_teacher_stays_finite():
    """A top-k that holds all but rounding of the mass: the tail is floored, reverse KL stays finite."""
    t = torch.zeros(2, V, dtype=torch.float32)
    t[:, 0] = 40.0
    s = torch.zeros(2, V, dtype=torch.float32, requires_grad=True)
    for kind in LOSSES:
        loss = distill_loss(s, _sparse(t, 2), kind)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all(), kind
        s.grad = None


def test_bad_inputs_are_clear_errors():
    t, s = _rows(2, 7)
    with pytest.raises(ValueError, match="unknown loss"):
        distill_loss(s, t, "mse")
    with pytest.raises(ValueError, match="beta"):
        distill_loss(s, t, "jsd", beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        distill_loss(s, t, temperature=0)
    with pytest.raises(ValueError, match="differ in shape"):
        distill_loss(s, t[:, :5])
    with pytest.raises(ValueError, match=r"in \[0, 11\)"):
        distill_loss(s, SparseTarget(torch.tensor([[0, 11], [1, 2]]), torch.full((2, 2), -1.0)))
    with pytest.raises(ValueError, match="no positions"):
        distill_loss(s, t, mask=torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs labels"):
        distill_loss(s, t, alpha=0.5)
    with pytest.raises(ValueError, match="differ in shape"):
        SparseTarget(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 2))


def test_buckets_shapes():
    t, s = _rows(2, 8)
    assert [x.shape[-1] for x in buckets(s, _sparse(t, 4))] == [5, 5]
    assert [x.shape[-1] for x in buckets(s, _sparse(t, V))] == [V, V]
    lp, lq = buckets(s, _sparse(t, 4))
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(lq.exp().sum(-1), torch.ones(2, dtype=torch.float64))
