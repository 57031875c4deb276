"""Speculative decoding on the worker side: the proposer interface, the n-gram (prompt lookup) proposer and
the :class:`Speculator` that decides each request's draft length and keeps the drafts' distributions until they
are verified. The draft-model proposer lives in :mod:`fastinfer.worker.draft_model`; verification in
:mod:`fastinfer.worker.rejection_sampler`.

Verification of k drafts uses the target's logits at the k+1 positions ending in the drafts. Greedy:
accept while the draft equals the argmax, then emit the argmax (exact match with plain greedy decoding).
Sampling, with the same temperature / top-k / top-p / min-p as plain sampling: a draft d proposed with
probability q(d) is accepted with probability min(1, p(d) / q(d)); on rejection the token comes from the
normalised residual max(0, p - q). The n-gram proposer is deterministic (q is one-hot on d), so acceptance
is p(d) and the residual is p without d; a draft model passes its rows q [k, V]. The output distribution
is exactly the target's.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from fastinfer.config import SpeculativeConfig


@dataclass
class Draft:
    """Proposed tokens for one request and, for sampled drafts, the distributions they were drawn from."""

    token_ids: list[int]
    probs: torch.Tensor | None = None  # [len(token_ids), V] fp32 rows q_i; None: deterministic (one-hot q)


class Proposer(Protocol):
    """Everything the worker asks of a speculative proposer (n-gram lookup, draft model).

    ``propose`` gets requests whose computed tokens are one behind their total (the last token is the next input),
    ``ks[i]`` >= 1 tokens to propose for ``reqs[i]`` and its KV block ids (one list per KV cache group). A proposer
    with ``needs_kv_slots`` writes its own KV at positions up to ``num_tokens + k - 2``: the scheduler reserves
    those as lookahead slots. It may return fewer tokens than asked (none at all). ``last_step_s`` is the measured
    time of one draft step of the last proposal without its catch-up (None when not measured) and ``lag(req)`` the
    tokens of ``req`` the proposer has not seen yet (0 for a stateless proposer)."""

    needs_kv_slots: bool
    last_step_s: float | None

    def propose(self, reqs: list[Any], ks: list[int], block_ids: list[tuple[list[int], ...]]) -> list[Draft]: ...

    def lag(self, req: Any) -> int: ...


class NgramProposer:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the longest suffix n-gram."""

    needs_kv_slots = False
    last_step_s: float | None = None

    def __init__(self, n_max: int, n_min: int) -> None:
        self.n_max, self.n_min = n_max, n_min

    def lag(self, req: Any) -> int:
        return 0

    def propose(self, reqs: list[Any], ks: list[int], block_ids: list[tuple[list[int], ...]]) -> list[Draft]:
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


def speculation_allowed(req: Any) -> bool:
    """Requests whose per-position sampling depends on output history (penalties, bad words, min_tokens) or that
    change the logits the verification reads (logit_bias, allowed_token_ids) are not speculated (kept exact); a
    grammar does not stop speculation (the verified rows are masked per draft position)."""
    sp = req.sampling_params
    return not (sp.needs_penalties or sp.needs_logit_rules or sp.logprobs is not None
                or req.num_output_tokens < sp.min_tokens)


class Speculator:
    """Runs the proposer for the requests that just sampled, with a draft length per request, and keeps each
    request's draft distributions until the step that verifies them.

    Draft length: none while the batch is larger than ``disable_by_batch_size``. N-gram lookup is free:
    ``k_max``, or 1 while the request's acceptance (moving average ``a``) stays low. A draft model
    (``cost_aware``) costs ``c`` target steps per draft step (both measured): the k in 0..k_max with the most
    expected tokens per unit of time, (1 - a^(k+1)) / (1 - a) / (1 + k c); when that is 0 (no drafts), one
    draft every PROBE_EVERY tokens keeps ``a`` up to date. No drafts while the draft's catch-up exceeds 4x
    the tokens the request has left."""

    PROBE_EVERY = 64

    def __init__(self, spec: SpeculativeConfig, proposer: Proposer, max_model_len: int) -> None:
        self.spec, self.proposer, self.max_model_len = spec, proposer, max_model_len
        self.step_s: float | None = None  # moving average of a decode / verify step of the target
        self.draft_step_s: float | None = None  # ... and of one draft-model step (catch-up excluded)
        self._drafts: dict[str, tuple[Any, Draft]] = {}  # proposed, not yet verified (or re-proposed)

    def record_step_time(self, seconds: float) -> None:
        """A target step that was decode / verify only (no prefill)."""
        self.step_s = seconds if self.step_s is None else 0.8 * self.step_s + 0.2 * seconds

    def record_acceptance(self, req: Any, num_drafts: int, num_accepted: int) -> None:
        req.spec_acceptance = 0.7 * req.spec_acceptance + 0.3 * num_accepted / num_drafts

    def drop(self, req_ids: list[str]) -> None:
        for rid in req_ids:
            self._drafts.pop(rid, None)

    def draft_probs(self, req: Any, draft: list[int]) -> torch.Tensor | None:
        """q rows [len(draft), V] of the drafts being verified (None: deterministic drafts or greedy)."""
        entry = self._drafts.pop(req.request_id, None)
        if entry is None or entry[0] is not req or entry[1].token_ids[:len(draft)] != draft:
            if req.sampling_params.greedy:
                return None  # exact match needs no q
            raise RuntimeError(f"request {req.request_id}: the drafts to verify are not the proposed ones")
        probs = entry[1].probs
        return None if probs is None else probs[:len(draft)]

    def propose(self, reqs: list[Any], block_ids: list[tuple[list[int], ...]], batch_size: int,
                ) -> dict[str, list[int]]:
        """Drafts for ``reqs`` (each just sampled its next token) given their block ids (lookahead included)."""
        if batch_size > self.spec.disable_by_batch_size:
            return {}
        chosen, ks, tables = [], [], []
        for req, blocks in zip(reqs, block_ids):
            if not speculation_allowed(req):
                continue  # sampling that depends on history
            sp = req.sampling_params
            room = min((sp.max_tokens or self.max_model_len) - req.num_output_tokens,
                       self.max_model_len - req.num_tokens) - 1
            k = min(self.draft_length(req, self.spec.num_speculative_tokens), room)
            if k > 0:
                chosen.append(req)
                ks.append(k)
                tables.append(blocks)
        if not chosen:
            return {}
        drafts = self.proposer.propose(chosen, ks, tables)
        per_step = self.proposer.last_step_s
        if self.proposer.needs_kv_slots and per_step is not None:
            self.draft_step_s = per_step if self.draft_step_s is None else 0.8 * self.draft_step_s + 0.2 * per_step
        out = {}
        for req, d in zip(chosen, drafts):
            self._drafts[req.request_id] = (req, d)
            if d.token_ids:
                out[req.request_id] = list(d.token_ids)
        return out

    def draft_length(self, req: Any, k_max: int) -> int:
        a = req.spec_acceptance
        if not (self.proposer.needs_kv_slots and self.spec.cost_aware):
            return k_max if a >= 0.3 else 1
        sp = req.sampling_params
        left = (sp.max_tokens or self.max_model_len) - req.num_output_tokens
        if self.proposer.lag(req) > 4 * left:
            return 0  # catching the draft up (e.g. when a large batch has shrunk) would cost more than it can save
        if self.step_s is None or self.draft_step_s is None:
            return k_max  # nothing measured yet
        c = self.draft_step_s / max(self.step_s, 1e-9)
        best_k, best = 0, 1.0
        for k in range(1, k_max + 1):
            tokens = k + 1 if a >= 0.999 else (1 - a ** (k + 1)) / (1 - a)
            rate = tokens / (1 + k * c)
            if rate > best:
                best_k, best = k, rate
        if best_k == 0 and req.num_output_tokens % self.PROBE_EVERY == 0:
            return 1
        return best_k


def timed(fn: Any, *args: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0
