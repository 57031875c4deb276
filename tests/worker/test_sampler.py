"""Sampler: filters keep exactly the right tokens, sampling follows the distribution, penalties are exact,
seeded rows do not depend on batch mates."""
from __future__ import annotations

import math

import pytest
import torch

from fastinfer.core.request import Request
from fastinfer.sampling_params import SamplingParams
from fastinfer.worker.sampler import apply_penalties, sample

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def _req(rid="r", outputs=(), prompt=(9,), eos=(), index=0, **kw):
    r = Request(rid, list(prompt), SamplingParams(**kw), eos_token_ids=eos, sample_index=index)
    for t in outputs:
        r.append_output_token(t)
    return r


def _draw(params: dict, n=4000, logits=None) -> torch.Tensor:
    """Token counts over ``n`` independent draws of one row."""
    logits = PROBS.log() if logits is None else logits
    reqs = [_req(f"r{i}", seed=i, **params) for i in range(n)]
    toks = sample(logits.expand(n, -1).clone(), reqs).token_ids
    return torch.bincount(torch.tensor(toks), minlength=logits.numel())


@pytest.mark.parametrize("params,allowed", [
    ({"top_k": 1}, {0}), ({"top_k": 2}, {0, 1}), ({"top_k": 3}, {0, 1, 2}),
    ({"top_p": 0.5}, {0}), ({"top_p": 0.8}, {0, 1}), ({"top_p": 0.81}, {0, 1, 2}),
    ({"min_p": 0.5}, {0, 1}), ({"min_p": 0.2}, {0, 1, 2}),
    ({"top_k": 3, "top_p": 0.6}, {0, 1}),
])
def test_filters_keep_exactly_the_allowed_set(params, allowed):
    counts = _draw({"temperature": 1.0, **params})
    assert {i for i, c in enumerate(counts.tolist()) if c} == allowed


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_sampling_follows_the_tempered_distribution(temperature):
    n = 20000
    counts = _draw({"temperature": temperature}, n=n).double()
    p = PROBS.double() ** (1 / temperature)
    p /= p.sum()
    chi2 = (((counts - n * p) ** 2) / (n * p)).sum().item()
    assert chi2 < 16.3  # 3 dof, p = 0.001


def test_greedy_is_argmax_and_ignores_seed():
    logits = torch.randn(3, 50)
    reqs = [_req(f"g{i}", temperature=0, seed=i) for i in range(3)]
    assert sample(logits, reqs).token_ids == logits.argmax(-1).tolist()


def test_seeded_rows_do_not_depend_on_batch_mates():
    torch.manual_seed(0)
    logits = torch.randn(6, 1000)
    reqs = [_req(f"s{i}", temperature=1.0, seed=100 + i, top_p=0.9) for i in range(6)]
    full = sample(logits, reqs).token_ids
    alone = [sample(logits[i:i + 1], [reqs[i]]).token_ids[0] for i in range(6)]
    reversed_ = sample(logits.flip(0), reqs[::-1]).token_ids[::-1]
    assert full == alone == reversed_
    other_step = _req("s0", temperature=1.0, seed=100, top_p=0.9, outputs=[1, 2])
    draws = {sample(logits[:1], [other_step]).token_ids[0] for _ in range(3)}
    assert len(draws) == 1  # deterministic per (seed, step)


def test_penalties_are_exact():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, 3.0]])
    r = _req(outputs=[0, 0, 1], prompt=[3], repetition_penalty=2.0, frequency_penalty=0.5,
             presence_penalty=0.25)
    apply_penalties(logits, [r])
    # token 0: 2/2 - 0.5*2 - 0.25; token 1: -2*2 - 0.5 - 0.25; token 3 (prompt only): 0.5/2; others unchanged
    expected = torch.tensor([[1.0 - 1.0 - 0.25, -4.0 - 0.5 - 0.25, 1.0, 0.25, 3.0]])
    assert torch.allclose(logits, expected)


def test_min_tokens_bans_eos_and_stop_ids():
    logits = torch.tensor([[0.0, 0.0, 10.0, 9.0, 1.0]])
    r = _req(eos=(2,), min_tokens=2, stop_token_ids=[3], temperature=0)
    assert sample(logits, [r]).token_ids == [4]
    r2 = _req(eos=(2,), min_tokens=1, temperature=0, outputs=[4])
    assert sample(logits, [r2]).token_ids == [2]


def test_logprobs_are_raw_log_softmax_with_ranked_alternatives():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    r = _req(temperature=0, logprobs=2, repetition_penalty=1.5, prompt=(0,))
    out = sample(logits, [r])
    lsm = logits.log_softmax(-1)[0]
    assert out.token_ids == [1]
    assert math.isclose(out.logprob[0], lsm[1].item(), rel_tol=1e-6)
    assert set(out.top_logprobs[0]) == {1, 2}
