"""Batched rejection sampling: greedy verification is exact, sampled verification (deterministic or sampled
drafts) reproduces the target distribution, seeded requests do not depend on batch mates, draft sampling
follows q, and nothing syncs with the device (checked under fake CUDA tensors)."""
from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    FakeTensorDeviceMismatchError,
    FakeTensorMode,
)

from fastinfer.core.request import Request
from fastinfer.sampling_params import SamplingParams
from fastinfer.worker import rejection_sampler
from fastinfer.worker.rejection_sampler import draft_sample, rejection_sample, verify
from fastinfer.worker.sampler import filtered_probs
from tests.engine.spec_models import chi2

PARAMS = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=3),
          SamplingParams(temperature=1.3, top_p=0.8)]


def _req(rid="r", seed=None, outputs=(), **kw) -> Request:
    r = Request(rid, [0], SamplingParams(seed=seed, **kw))
    for t in outputs:
        r.append_output_token(t)
    return r


def _within(stat: float, dof: int) -> bool:
    return stat < dof + 5 * (2 * dof) ** 0.5  # far inside the bulk of the chi-square distribution


def _cells(vocab: int, k: int) -> dict[tuple[int, ...], int]:
    """Index of every possible output sequence (lengths 1..k+1)."""
    seqs = [s for n in range(1, k + 2) for s in itertools.product(range(vocab), repeat=n)]
    return {s: i for i, s in enumerate(seqs)}


def _expected(p: torch.Tensor, q: torch.Tensor | None, drafts: list[int] | None, cells) -> torch.Tensor:
    """Exact law of the output sequence. Sampled drafts (q [k, V]): position j is accepted with probability
    min(p_j, q_j)(t) for token t (the maximal coupling), else a token comes from p_j - min(p_j, q_j); fixed
    drafts: position j emits d_j (and goes on) with probability p_j(d_j), another token t with p_j(t)."""
    k = p.shape[0] - 1
    out = torch.zeros(len(cells), dtype=torch.float64)
    p = p.double()
    for seq, idx in cells.items():
        prob = 1.0
        for j, t in enumerate(seq):
            last = j == len(seq) - 1
            if j == k:  # bonus
                prob *= p[j, t].item()
            elif q is not None:
                both = torch.minimum(p[j], q[j].double())
                prob *= both[t].item() if not last else (p[j, t] - both[t]).item()
            else:
                assert drafts is not None
                if not last:
                    prob *= p[j, t].item() if t == drafts[j] else 0.0
                else:
                    prob *= p[j, t].item() if t != drafts[j] else 0.0
        out[idx] = prob
    return out


def _counts(outs: list[list[int]], cells) -> torch.Tensor:
    c = torch.zeros(len(cells), dtype=torch.float64)
    for o in outs:
        c[cells[tuple(o)]] += 1
    return c


def test_greedy_accepts_the_matching_prefix_then_the_argmax():
    torch.manual_seed(0)
    vocab = 7
    drafts = [[], [1], [2, 3, 4], [5, 5], [0, 1, 2, 3]]
    logits = torch.randn(sum(len(d) + 1 for d in drafts), vocab)
    am = logits.argmax(-1).tolist()
    # make some drafts right: request 2 matches its first two, request 4 all four
    off = [0, 1, 3, 7, 10]
    drafts[2][:2] = am[off[2]:off[2] + 2]
    drafts[4] = am[off[4]:off[4] + 4]
    reqs = [_req(f"g{i}", temperature=0, seed=i) for i in range(len(drafts))]
    out = rejection_sample(logits, drafts, reqs)
    got = out.to_lists()
    for d, o, lst in zip(drafts, off, got):
        exp = []
        for j, t in enumerate(d):
            if t != am[o + j]:
                break
            exp.append(t)
        assert lst == exp + [am[o + len(exp)]]
    assert got[2][:2] == drafts[2][:2] and len(got[4]) == 5
    assert out.token_ids.shape == (5, 5) and out.num_accepted.tolist() == [len(g) - 1 for g in got]
    assert all(t == -1 for row, g in zip(out.token_ids.tolist(), got) for t in row[len(g):])


@pytest.mark.parametrize("params", PARAMS, ids=["temperature", "top_k", "top_p"])
def test_batched_verification_with_sampled_drafts_is_the_target(params):
    """One call verifies n requests whose drafts were drawn from q (unlike p); the law of the emitted sequence
    must be the target's. The same statistic catches verifying those drafts as if they were deterministic."""
    torch.manual_seed(0)
    vocab, k, n = 4, 2, 4000
    p_logits = torch.randn(k + 1, vocab) * 1.5
    q = filtered_probs(torch.randn(k, vocab) * 1.5, [params] * k)  # [k, V]
    p = filtered_probs(p_logits, [params] * (k + 1))
    g = torch.Generator().manual_seed(1)
    drafts = torch.multinomial(q, n, replacement=True, generator=g).T.tolist()  # [n, k], row j ~ q_j
    reqs = [_req(f"r{i}", seed=i, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
            for i in range(n)]
    logits = p_logits.repeat(n, 1)
    cells = _cells(vocab, k)
    expected = _expected(p, q, None, cells)
    assert abs(expected.sum().item() - 1) < 1e-6
    outs = rejection_sample(logits, drafts, reqs, [q] * n).to_lists()
    assert _within(*chi2(_counts(outs, cells), expected, n))
    wrong = rejection_sample(logits, drafts, reqs, None).to_lists()  # q ignored: acceptance p(d)
    bad, bad_dof = chi2(_counts(wrong, cells), expected, n)
    assert bad > bad_dof + 10 * (2 * bad_dof) ** 0.5


@pytest.mark.parametrize("params", PARAMS[:2], ids=["temperature", "top_k"])
def test_batched_verification_with_fixed_drafts_is_the_target(params):
    torch.manual_seed(3)
    vocab, k, n = 4, 2, 4000
    p_logits = torch.randn(k + 1, vocab) * 1.5
    p = filtered_probs(p_logits, [params] * (k + 1))
    d = [int(p[0].argmax()), int(p[1].argmin() if params.top_k == 0 else p[1].argmax())]
    reqs = [_req(f"r{i}", seed=i, temperature=params.temperature, top_k=params.top_k) for i in range(n)]
    outs = rejection_sample(p_logits.repeat(n, 1), [d] * n, reqs).to_lists()
    cells = _cells(vocab, k)
    assert _within(*chi2(_counts(outs, cells), _expected(p, None, d, cells), n))


def test_seeded_verification_does_not_depend_on_batch_mates():
    torch.manual_seed(4)
    vocab = 50
    items = [  # (request, drafts, q or None)
        (_req("a", seed=1), [3, 4, 5], filtered_probs(torch.randn(3, vocab), [SamplingParams()] * 3)),
        (_req("b", seed=2, top_p=0.9, outputs=[1, 2]), [7, 7], None),
        (_req("c", temperature=0), [1], None),
        (_req("d", seed=3, temperature=0.5), [], None),
        (_req("e"), [2, 2, 2, 2], None),  # unseeded
        (_req("f", seed=4, min_p=0.05), [9], filtered_probs(torch.randn(1, vocab), [SamplingParams()])),
    ]
    logits = [torch.randn(len(d) + 1, vocab) for _, d, _ in items]
    for i, (_, d, _) in enumerate(items):  # make some drafts likely, so that acceptances happen
        if d:
            logits[i][0, d[0]] += 4.0

    def run(order):
        out = rejection_sample(torch.cat([logits[i] for i in order]), [items[i][1] for i in order],
                               [items[i][0] for i in order], [items[i][2] for i in order]).to_lists()
        return dict(zip(order, out))

    full = run(list(range(6)))
    rev = run(list(range(6))[::-1])
    for i in (0, 1, 2, 3, 5):
        alone = verify(logits[i], items[i][1], items[i][0], None, items[i][2])
        assert full[i] == rev[i] == alone
    assert any(len(full[i]) > 1 for i in (0, 1, 5))  # some drafts were accepted
    # a different step draws differently (over a few seeds)
    later = [verify(logits[1], [7, 7], _req("b", seed=s, top_p=0.9, outputs=[1, 2, 3]), None) for s in range(8)]
    now = [verify(logits[1], [7, 7], _req("b", seed=s, top_p=0.9, outputs=[1, 2]), None) for s in range(8)]
    assert later != now


def test_all_zero_residual_accepts():
    """p == q (the draft model is the target): every draft is accepted."""
    torch.manual_seed(5)
    logits = torch.randn(4, 6)
    q = filtered_probs(logits[:3], [SamplingParams()] * 3)
    reqs = [_req(f"z{i}", seed=i) for i in range(50)]
    drafts = [torch.multinomial(q, 1).flatten().tolist() for _ in reqs]
    out = rejection_sample(logits.repeat(50, 1), drafts, reqs, [q] * 50)
    assert out.num_accepted.tolist() == [3] * 50


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="sum"):
        rejection_sample(torch.randn(3, 5), [[1, 2], [3]], [_req("a"), _req("b")])
    with pytest.raises(ValueError, match="draft_probs"):
        rejection_sample(torch.randn(3, 5), [[1, 2]], [_req("a")], [torch.rand(1, 5)])


def test_draft_sample_follows_q_and_returns_it():
    n, vocab = 4000, 5
    torch.manual_seed(6)
    logits = torch.randn(1, vocab).expand(n, -1).clone()
    params = SamplingParams(temperature=0.8, top_k=4)
    reqs = [_req(f"d{i}", seed=i, temperature=0.8, top_k=4) for i in range(n)]
    tokens, q = draft_sample(logits, reqs, step=1)
    assert q is not None and torch.allclose(q, filtered_probs(logits, [params] * n))
    expected = q[0].double()
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert _within(*chi2(counts, expected, n))
    again, _ = draft_sample(logits, reqs, step=1)
    assert torch.equal(tokens, again)  # seeded: a pure function of (seed, index, step)
    other, _ = draft_sample(logits, reqs, step=2)
    assert not torch.equal(tokens, other)
    # greedy rows: the argmax, and a one-hot q; all greedy: no q
    mixed = [_req("g", temperature=0), reqs[0]]
    t2, q2 = draft_sample(logits[:2], mixed, step=1)
    assert q2 is not None and t2.tolist() == [int(logits[0].argmax()), tokens[0].item()]
    assert torch.equal(q2[0], torch.nn.functional.one_hot(logits[0].argmax(), vocab).float())
    assert draft_sample(logits[:1], mixed[:1], step=0)[1] is None


# -- no device synchronisation, no tensor off the logits' device ---------------------------------------------
def _fake_cuda_run(generator=None):
    vocab = 32
    reqs = [_req("g", temperature=0), _req("s", seed=1, top_k=5), _req("u", top_p=0.9),
            _req("m", seed=2, min_p=0.1, outputs=[3])]
    drafts = [[1, 2], [3], [], [4, 5, 6]]
    with FakeTensorMode():
        logits = torch.randn(sum(len(d) + 1 for d in drafts), vocab, device="cuda")
        draft_logits = torch.randn(len(reqs), vocab, device="cuda")
        toks, q = draft_sample(draft_logits, reqs, step=0, generator=generator)
        assert toks.device.type == "cuda" and q is not None and q.device.type == "cuda"
        probs = [None, torch.rand(1, vocab, device="cuda"), None, torch.rand(3, vocab, device="cuda")]
        for dp in (probs, None):
            out = rejection_sample(logits, drafts, reqs, dp, generator)
            assert out.token_ids.device.type == "cuda" and out.num_accepted.device.type == "cuda"
            assert out.token_ids.shape == (4, 4)


@pytest.mark.parametrize("generator", [None, "cpu"])
def test_rejection_sampling_runs_on_fake_cuda_without_syncs(generator):
    _fake_cuda_run(torch.Generator().manual_seed(0) if generator else None)


def test_the_fake_cuda_check_catches_a_cpu_tensor(monkeypatch):
    real = rejection_sampler._upload
    monkeypatch.setattr(rejection_sampler, "_upload",
                        lambda data, dtype, device: real(data, dtype, torch.device("cpu")))
    with pytest.raises(FakeTensorDeviceMismatchError):
        _fake_cuda_run()


def test_the_fake_cuda_check_catches_a_sync(monkeypatch):
    real = rejection_sampler.inverse_cdf

    def syncing(weights, u):
        tokens, total = real(weights, u)
        _ = total.tolist()  # a device-to-host copy
        return tokens, total

    monkeypatch.setattr(rejection_sampler, "inverse_cdf", syncing)
    with pytest.raises(DataDependentOutputException):
        _fake_cuda_run()


@pytest.mark.gpu
def test_cuda_verification_matches_cpu_and_never_syncs():
    torch.manual_seed(0)
    vocab = 1000
    reqs = [_req("g", temperature=0), _req("s", seed=1, top_k=50), _req("u", top_p=0.9),
            _req("m", seed=2, min_p=0.01, outputs=[3])]
    drafts = [[1, 2], [3], [], [4, 5, 6]]
    logits = torch.randn(sum(len(d) + 1 for d in drafts), vocab) * 3
    q = [None, filtered_probs(torch.randn(1, vocab), [SamplingParams()]), None, None]
    gen = torch.Generator(device="cuda").manual_seed(0)
    dl = torch.randn(4, vocab).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = rejection_sample(logits.cuda(), drafts, reqs, [None if t is None else t.cuda() for t in q], gen)
        draft_sample(dl, reqs, 0, gen)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cuda = out.to_lists()
    cpu = rejection_sample(logits, drafts, reqs, q).to_lists()
    for i in (0, 1, 3):  # greedy and seeded requests
        assert cuda[i] == cpu[i]


def test_verify_compat_signature():
    r = dataclasses.replace(SamplingParams(), temperature=0)
    logits = torch.tensor([[0.0, 5.0, 0.0], [5.0, 0.0, 0.0]])
    assert verify(logits, [1], Request("x", [0], r), None) == [1, 0]
    assert verify(logits, [2], Request("x", [0], r), None, None) == [1]
