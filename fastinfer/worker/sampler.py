"""Turn logits into tokens: penalties, greedy or temperature / top-k / top-p / min-p sampling, logprobs.

Seeded requests draw their noise from a generator seeded with (seed, sample index, step), so a sample
depends only on its own logits and seed: not on batch mates, batch order or preemption.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fastinfer.core.request import Request
from fastinfer.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (splitmix64 steps), for per-step generators."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (p & _MASK64)) & _MASK64
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x & ((1 << 63) - 1)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprob: list[float | None]  # of the sampled token, when asked for
    top_logprobs: list[dict[int, float] | None]  # sampled token + top-k alternatives, when asked for


def apply_penalties(logits: torch.Tensor, reqs: Sequence[Request]) -> None:
    """In place: repetition (prompt + output tokens), frequency and presence (output tokens) penalties,
    and min_tokens (EOS / stop ids banned until enough tokens exist)."""
    vocab = logits.shape[1]
    for i, req in enumerate(reqs):
        sp = req.sampling_params
        if req.num_output_tokens < sp.min_tokens:
            banned = list(sp.stop_token_ids or ()) + ([] if sp.ignore_eos else list(req.eos_token_ids))
            banned = [t for t in banned if 0 <= t < vocab]
            if banned:
                logits[i, banned] = float("-inf")
        if not sp.needs_penalties:
            continue
        row = logits[i]
        out = torch.tensor(req.output_token_ids, dtype=torch.long)
        counts = torch.bincount(out, minlength=vocab)[:vocab].to(row.dtype) if len(out) else torch.zeros_like(row)
        if sp.repetition_penalty != 1.0:
            seen = counts > 0
            seen[torch.tensor(req.prompt_token_ids, dtype=torch.long)] = True
            rp = sp.repetition_penalty
            row.copy_(torch.where(seen, torch.where(row > 0, row / rp, row * rp), row))
        if sp.frequency_penalty:
            row.sub_(sp.frequency_penalty * counts)
        if sp.presence_penalty:
            row.sub_(sp.presence_penalty * (counts > 0).to(row.dtype))


def _filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what top-k, top-p and min-p exclude; rows are independent."""
    vocab = logits.shape[1]
    if bool((top_k < vocab).any()) or bool((top_p < 1).any()):
        sorted_l, idx = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device)
        drop = ranks[None, :] >= top_k[:, None]
        probs = sorted_l.softmax(dim=-1)
        drop |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]  # keep the smallest set reaching top_p
        drop[:, 0] = False
        sorted_l = sorted_l.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, idx, sorted_l)
    if bool((min_p > 0).any()):
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return logits


def filtered_probs(logits: torch.Tensor, sps: Sequence[SamplingParams]) -> torch.Tensor:
    """Probabilities after temperature, top-k, top-p and min-p, one row per params (non-greedy rows)."""
    vocab = logits.shape[1]
    sub = logits / torch.tensor([sp.temperature for sp in sps])[:, None]
    top_k = torch.tensor([sp.top_k if sp.top_k > 0 else vocab for sp in sps])
    sub = _filter(sub, top_k, torch.tensor([sp.top_p for sp in sps]), torch.tensor([sp.min_p for sp in sps]))
    return sub.softmax(dim=-1)


def sample(logits: torch.Tensor, reqs: Sequence[Request], generator: torch.Generator | None = None,
           ) -> SamplerOutput:
    """Sample one token per row of ``logits`` [S, V] (fp32) for ``reqs[i]``."""
    s, vocab = logits.shape
    raw = logits
    if any(r.sampling_params.needs_penalties or r.num_output_tokens < r.sampling_params.min_tokens for r in reqs):
        logits = logits.clone()
        apply_penalties(logits, reqs)
    greedy = [r.sampling_params.greedy for r in reqs]
    tokens = logits.argmax(dim=-1)
    rand_rows = [i for i, g in enumerate(greedy) if not g]
    if rand_rows:
        sps = [reqs[i].sampling_params for i in rand_rows]
        probs = filtered_probs(logits[rand_rows], sps)
        noise = torch.empty_like(probs)
        unseeded = [j for j, sp in enumerate(sps) if sp.seed is None]
        if unseeded:
            noise[unseeded] = torch.empty(len(unseeded), vocab).exponential_(generator=generator)
        for j, sp in enumerate(sps):
            if sp.seed is not None:
                req = reqs[rand_rows[j]]
                g = torch.Generator().manual_seed(mix_seed(sp.seed, req.sample_index, req.num_output_tokens))
                noise[j].exponential_(generator=g)
        tokens[rand_rows] = (probs / noise).argmax(dim=-1)  # exponential race == categorical sample
    token_list = tokens.tolist()
    logprob: list[float | None] = [None] * s
    top: list[dict[int, float] | None] = [None] * s
    lp_rows = [i for i, r in enumerate(reqs) if r.sampling_params.logprobs is not None]
    if lp_rows:
        lps = raw[lp_rows].log_softmax(dim=-1)
        for j, i in enumerate(lp_rows):
            k = reqs[i].sampling_params.logprobs or 0
            tok = token_list[i]
            chosen = float(lps[j, tok])
            logprob[i] = chosen
            d = {tok: chosen}
            if k:
                vals, ids = lps[j].topk(k)
                d.update(zip(ids.tolist(), vals.tolist()))
            top[i] = d
    return SamplerOutput(token_list, logprob, top)
