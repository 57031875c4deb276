"""Speculative decoding on the worker side: the proposer interface, the n-gram (prompt lookup) proposer
and lossless verification. The draft-model proposer lives in :mod:`fastinfer.worker.draft_model`.

Verification of k drafts uses the target's logits at the k+1 positions ending in the drafts. Greedy:
accept while the draft equals the argmax, then emit the argmax (exact match with plain greedy decoding).
Sampling, with the same temperature / top-k / top-p / min-p as plain sampling: a draft d proposed with
probability q(d) is accepted with probability min(1, p(d) / q(d)); on rejection the token comes from the
normalised residual max(0, p - q). The n-gram proposer is deterministic (q is one-hot on d), so acceptance
is p(d) and the residual is p without d; a draft model passes its rows q [k, V]. The output distribution
is exactly the target's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from fastinfer.core.request import Request
from fastinfer.worker.sampler import filtered_probs, mix_seed

# stream ids of mix_seed for seeded requests: verification draws, draft-model sampling (plain sampling has none)
VERIFY_STREAM = 1
DRAFT_STREAM = 2


@dataclass
class Draft:
    """Proposed tokens for one request and, for sampled drafts, the distributions they were drawn from."""

    token_ids: list[int]
    probs: torch.Tensor | None = None  # [len(token_ids), V] fp32 rows q_i; None: deterministic (one-hot q)


class Proposer(Protocol):
    """What the engine asks of a speculative proposer (n-gram lookup, draft model).

    ``propose`` gets running requests whose computed tokens are one behind their total (the last token is
    the next input), ``ks[i]`` >= 1 tokens to propose for ``reqs[i]`` and its KV block ids. A proposer with
    ``needs_kv_slots`` writes its own KV at positions up to ``num_tokens + k - 2``, so the engine reserves
    those slots first. It may return fewer tokens than asked (none at all)."""

    needs_kv_slots: bool

    def propose(self, reqs: list[Request], ks: list[int], block_ids: list[list[int]]) -> list[Draft]: ...


class NgramProposer:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the longest suffix n-gram."""

    needs_kv_slots = False

    def __init__(self, n_max: int, n_min: int) -> None:
        self.n_max, self.n_min = n_max, n_min

    def propose(self, reqs: list[Request], ks: list[int], block_ids: list[list[int]]) -> list[Draft]:
        return [Draft(propose_ngram(r.all_token_ids, k, self.n_max, self.n_min)) for r, k in zip(reqs, ks)]


def propose_ngram(tokens: list[int], k: int, n_max: int, n_min: int) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the longest suffix n-gram."""
    length = len(tokens)
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        suffix = tokens[length - n:]
        first = suffix[0]
        for start in range(length - n - 1, -1, -1):
            if tokens[start] == first and tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


def speculation_allowed(req: Request) -> bool:
    """Requests whose per-position sampling depends on output history are not speculated (kept exact)."""
    sp = req.sampling_params
    return not (sp.needs_penalties or sp.logprobs is not None or req.num_output_tokens < sp.min_tokens)


def verify(logits: torch.Tensor, draft: list[int], req: Request, generator: torch.Generator | None,
           draft_probs: torch.Tensor | None = None) -> list[int]:
    """Tokens to append for one request: the accepted drafts plus one token from the target.
    ``logits`` [k+1, V] fp32 at the positions that predict draft[0..k-1] and the bonus token; ``draft_probs``
    [k, V] the (filtered) distributions q the drafts were sampled from, None for deterministic drafts."""
    sp = req.sampling_params
    if sp.greedy:
        target = logits.argmax(dim=-1).tolist()
        out = []
        for d, t in zip(draft, target):
            if d != t:
                break
            out.append(d)
        return out + [target[len(out)]]
    probs = filtered_probs(logits, [sp] * logits.shape[0])  # [k+1, V]
    out = []
    for i, d in enumerate(draft):
        g = _generator(req, i, generator)
        p_d = probs[i, d].item()
        q_d = 1.0 if draft_probs is None else draft_probs[i, d].item()
        if torch.rand((), generator=g).item() * q_d < p_d:  # probability min(1, p(d) / q(d))
            out.append(d)
            continue
        if draft_probs is None:
            residual = probs[i].clone()
            residual[d] = 0.0  # max(0, p - onehot(d))
        else:
            residual = (probs[i] - draft_probs[i]).clamp_(min=0.0)  # [V]
        if residual.sum() <= 0:  # p <= q everywhere means p == q: cannot reject in exact arithmetic
            out.append(d)
            continue
        return out + [int(torch.multinomial(residual / residual.sum(), 1, generator=g))]
    g = _generator(req, len(draft), generator)
    return out + [int(torch.multinomial(probs[len(draft)], 1, generator=g))]


def _generator(req: Request, offset: int, fallback: torch.Generator | None) -> torch.Generator | None:
    seed = req.sampling_params.seed
    if seed is None:
        return fallback
    return torch.Generator().manual_seed(mix_seed(seed, req.sample_index, req.num_output_tokens + offset,
                                                  VERIFY_STREAM))
