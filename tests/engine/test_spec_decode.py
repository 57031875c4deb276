"""Speculative decoding (n-gram prompt lookup): greedy output identical to plain decoding (batches,
preemption, prefix hits); sampled output has exactly the target distribution (a wrong rule fails)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fastinfer import SamplingParams
from fastinfer.core.request import Request
from fastinfer.worker.rejection_sampler import verify
from fastinfer.worker.sampler import filtered_probs
from fastinfer.worker.spec_decode import propose_ngram

PASSAGE = ("The printing press spread across Europe in the fifteenth century. The printing press made books "
           "cheaper. Books became cheaper and the printing press spread. ")
PROMPTS = [PASSAGE + "Repeat the passage above exactly:", "1 2 3 1 2 3 1 2 3 1 2", "abc abc abc abc"]
SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1,
        "disable_by_batch_size": 8}


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_propose_ngram():
    assert propose_ngram([1, 2, 3, 4, 1, 2], 3, 2, 1) == [3, 4, 1]
    assert propose_ngram([1, 2, 3, 4, 1, 2], 1, 2, 1) == [3]
    assert propose_ngram([5, 6, 7], 2, 3, 1) == []
    assert propose_ngram([9, 1, 9, 2, 9], 2, 1, 1) == [2, 9]  # latest earlier occurrence wins


@pytest.mark.parametrize("kw", [{}, {"num_kv_blocks": 30, "block_size": 4, "max_model_len": 96}])
def test_greedy_identical_with_and_without_speculation(tiny_llm, kw):
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain = _tokens(tiny_llm("llama", **kw).generate(PROMPTS, sp, use_tqdm=False))
    spec = tiny_llm("llama", speculative_config=SPEC, **kw)
    for _ in range(2):  # second pass: prefix-cache hits
        assert _tokens(spec.generate(PROMPTS, sp, use_tqdm=False)) == plain
    one_by_one = [_tokens(spec.generate(p, sp, use_tqdm=False))[0] for p in PROMPTS]
    assert one_by_one == plain
    st = spec.engine.spec_stats
    assert st["draft_tokens"] > 0 and st["accepted_tokens"] > 0
    if kw:
        assert spec.engine.scheduler.num_preemptions > 0
    assert spec.engine.kv.pool.num_free_blocks == spec.engine.num_kv_blocks


def test_large_batches_switch_speculation_off(tiny_llm):
    spec = tiny_llm("llama", speculative_config={**SPEC, "disable_by_batch_size": 2})
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    spec.generate(PROMPTS * 2, sp, use_tqdm=False)  # 6 running: above the limit until most finish
    busy = spec.engine.spec_stats["steps"]
    spec.generate(PROMPTS[0], sp, use_tqdm=False)
    assert spec.engine.spec_stats["steps"] > busy  # alone, it speculates


def _first_two(params: SamplingParams, logits: torch.Tensor, draft: list[int], n: int, rule) -> torch.Tensor:
    """Counts of (first, second) emitted token over n verifications with fresh seeds."""
    vocab = logits.shape[1]
    counts = torch.zeros(vocab * vocab + vocab)
    for i in range(n):
        req = Request("r", [0], dataclasses.replace(params, seed=i))
        toks = rule(logits, draft, req, None)
        idx = toks[0] * vocab + toks[1] if len(toks) > 1 else vocab * vocab + toks[0]
        counts[idx] += 1
    return counts


def _wrong_verify(logits, draft, req, generator):
    """Accept with p(d) but resample from p itself (not the residual): over-weights the draft token."""
    probs = filtered_probs(logits, [req.sampling_params] * logits.shape[0])
    g = torch.Generator().manual_seed(req.sampling_params.seed)
    out = []
    for i, d in enumerate(draft):
        if torch.rand((), generator=g).item() < probs[i, d].item():
            out.append(d)
            continue
        return out + [int(torch.multinomial(probs[i], 1, generator=g))]
    return out + [int(torch.multinomial(probs[len(draft)], 1, generator=g))]


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=3),
                                    SamplingParams(temperature=1.3, top_p=0.8)])
def test_sampled_distribution_is_the_target(params):
    torch.manual_seed(0)
    vocab, n = 5, 6000
    logits = torch.randn(2, vocab) * 1.5  # rows: position of draft 0, bonus position
    p = filtered_probs(logits, [params] * 2)
    kept = (p[0] > 0).nonzero().flatten().tolist()
    assert len(kept) >= 2  # the draft must be a possible but unlikely token, or no rule could be told apart
    draft = [min(kept, key=lambda t: p[0, t].item())]
    # target: first token ~ p[0]; if it is the draft, the second ~ p[1]
    expected = torch.zeros(vocab * vocab + vocab)
    for t in range(vocab):
        if t == draft[0]:
            expected[t * vocab:(t + 1) * vocab] = p[0, t] * p[1]
        else:
            expected[vocab * vocab + t] = p[0, t]

    def chi2(counts):
        """(statistic, degrees of freedom); an impossible outcome makes the statistic infinite."""
        keep = expected > 0
        if counts[~keep].sum() > 0:
            return float("inf"), 0
        e = expected[keep] * n
        return float(((counts[keep] - e) ** 2 / e).sum()), int(keep.sum()) - 1

    stat, dof = chi2(_first_two(params, logits, draft, n, verify))
    assert stat < dof + 5 * (2 * dof) ** 0.5  # far inside the bulk of the chi-square distribution
    bad, bad_dof = chi2(_first_two(params, logits, draft, n, _wrong_verify))
    assert bad > bad_dof + 10 * (2 * bad_dof) ** 0.5  # the wrong rule is caught by the same test
