"""Speculative decoding on the worker side: the n-gram (prompt lookup) proposer and lossless verification.

Verification of k drafts uses the target's logits at the k+1 positions ending in the drafts. Greedy:
accept while the draft equals the argmax, then emit the argmax (exact match with plain greedy decoding).
Sampling, with the same temperature / top-k / top-p / min-p as plain sampling: a draft d proposed with
probability q(d) is accepted with probability min(1, p(d) / q(d)); on rejection the token comes from the
normalised residual max(0, p - q). The n-gram proposer is deterministic (q is one-hot on d), so acceptance
is p(d) and the residual is p without d. The output distribution is exactly the target's.
"""
from __future__ import annotations

import torch

from fastinfer.core.request import Request
from fastinfer.worker.sampler import filtered_probs, mix_seed


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
           ) -> list[int]:
    """Tokens to append for one request: the accepted drafts plus one token from the target.
    ``logits`` [k+1, V] fp32 at the positions that predict draft[0..k-1] and the bonus token."""
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
        if torch.rand((), generator=g).item() < probs[i, d].item():
            out.append(d)
            continue
        residual = probs[i].clone()
        residual[d] = 0.0
        if residual.sum() <= 0:  # p was one-hot on d: cannot reject in exact arithmetic
            out.append(d)
            continue
        return out + [int(torch.multinomial(residual / residual.sum(), 1, generator=g))]
    g = _generator(req, len(draft), generator)
    return out + [int(torch.multinomial(probs[len(draft)], 1, generator=g))]


def _generator(req: Request, offset: int, fallback: torch.Generator | None) -> torch.Generator | None:
    seed = req.sampling_params.seed
    if seed is None:
        return fallback
    return torch.Generator().manual_seed(mix_seed(seed, req.sample_index, req.num_output_tokens + offset, 1))
