"""Lossless verification of speculative drafts, batched over requests, on the logits' device, without syncs.

Request r proposed ``k_r`` drafts; the target's logits at its ``k_r + 1`` positions (the ones predicting each
draft, then the bonus position) are stacked for all requests: [sum(k_r + 1), V].

Greedy requests accept while the draft equals the argmax, then emit the argmax (token-identical with plain
greedy decoding). Sampled requests use the same temperature / top-k / top-p / min-p distribution p as plain
sampling: a draft d drawn with probability q(d) is accepted with probability min(1, p(d) / q(d)); on rejection
the token comes from the normalised residual max(0, p - q); after k accepted drafts a bonus token comes from
p at the last position. Deterministic drafts (n-gram lookup) have a one-hot q: acceptance p(d), residual p
without d. A residual that is zero everywhere (p <= q everywhere means p == q) accepts. The output is
distributed exactly as the target's own samples.

Seeded requests draw from :data:`~fastinfer.worker.sampler.VERIFY_STREAM` at step ``num_output_tokens + j``
for position j (column 0: the acceptance test, column 1: the residual or bonus draw), so a verification
depends only on the request's own seed, logits and drafts. :func:`draft_sample` draws drafts from
:data:`~fastinfer.worker.sampler.DRAFT_STREAM`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fastinfer.worker.sampler import (
    DRAFT_STREAM,
    VERIFY_STREAM,
    SamplingState,
    _upload,
    inverse_cdf,
    row_uniforms,
    sampling_probs,
)


@dataclass
class VerifyOutput:
    """Device tensors of one batched verification."""

    token_ids: torch.Tensor  # [R, k_max + 1] int64: accepted drafts, then one target token, then -1
    num_accepted: torch.Tensor  # [R] int64: accepted drafts (the request emits num_accepted + 1 tokens)

    def to_lists(self) -> list[list[int]]:
        """The tokens each request emits, in one device-to-host copy."""
        rows = torch.cat([self.num_accepted[:, None], self.token_ids], dim=1).tolist()
        return [row[1:row[0] + 2] for row in rows]


def rejection_sample(logits: torch.Tensor, draft_token_ids: Sequence[Sequence[int]],
                     states: Sequence[SamplingState], draft_probs: Sequence[torch.Tensor | None] | None = None,
                     generator: torch.Generator | None = None) -> VerifyOutput:
    """Verify ``draft_token_ids[r]`` (k_r tokens, maybe none) of every ``states[r]`` at once.

    ``logits`` [sum(k_r + 1), V] fp32: request r's k_r + 1 rows in order, requests one after another.
    ``draft_probs[r]``: the (filtered) distributions q [>= k_r, V] the drafts were sampled from, on the logits'
    device, or None for deterministic drafts (also: ``draft_probs`` None). ``generator`` draws the keys of
    unseeded requests (default: the device's default generator). Returns device tensors; no sync."""
    device = logits.device
    num = len(states)
    ks = [len(d) for d in draft_token_ids]
    if len(ks) != num:
        raise ValueError(f"{len(ks)} draft lists for {num} requests")
    n_rows = sum(ks) + num
    if logits.shape[0] != n_rows:
        raise ValueError(f"logits have {logits.shape[0]} rows, the drafts need sum(k + 1) = {n_rows}")
    k_max = max(ks, default=0)
    if num == 0:
        empty = torch.empty(0, dtype=torch.int64, device=device)
        return VerifyOutput(empty.view(0, 1), empty)
    sps = [st.sampling_params for st in states]
    # host tables over the flat rows: draft token (0 at bonus rows), position j, bonus flag
    flat_draft: list[int] = []
    flat_pos: list[int] = []
    flat_bonus: list[int] = []
    flat_req: list[int] = []
    padded: list[list[int]] = []  # [R, k_max + 1] flat row of (r, j); rows past k_r repeat the bonus row
    start = 0
    for r, (d, k) in enumerate(zip(draft_token_ids, ks)):
        flat_draft.extend(d)
        flat_draft.append(0)
        flat_pos.extend(range(k + 1))
        flat_bonus.extend([0] * k + [1])
        flat_req.extend([r] * (k + 1))
        padded.append([start + min(j, k) for j in range(k_max + 1)])
        start += k + 1
    host = [flat_draft, flat_pos, flat_bonus, [int(sps[r].greedy) for r in flat_req]]
    drafts, _, is_bonus, greedy_row = _upload(host, torch.int64, device).unbind(0)  # [N] each
    is_bonus, greedy_row = is_bonus.bool(), greedy_row.bool()
    num_drafts = _upload(ks, torch.int64, device).unsqueeze(1)  # [R, 1]
    pad_idx = _upload(padded, torch.int64, device)  # [R, k_max + 1]

    argmax = logits.argmax(dim=-1)  # [N]
    accept = drafts == argmax
    replace = argmax  # the token emitted at the first rejected position (or the bonus position)
    sampled_reqs = [not sp.greedy for sp in sps]
    if any(sampled_reqs):
        row_states = [states[r] for r in flat_req]
        probs = sampling_probs(logits, [sps[r] for r in flat_req])  # [N, V]
        u = row_uniforms(row_states, flat_pos, VERIFY_STREAM, 2, generator, device)  # [N, 2]
        d_col = drafts.unsqueeze(1)  # [N, 1]
        p_d = probs.gather(1, d_col).squeeze(1)  # [N]
        with_q = [r for r in range(num) if draft_probs is not None and draft_probs[r] is not None and ks[r]]
        if not with_q:  # deterministic drafts: q one-hot, acceptance p(d), residual p without d
            q_d = torch.ones_like(p_d)
            residual = probs.scatter(1, d_col, (p_d * is_bonus).unsqueeze(1))  # bonus rows keep p
        else:
            assert draft_probs is not None
            q = torch.zeros_like(probs)
            has_q = set(with_q)
            one_hot = [0 if r in has_q or b else 1 for r, b in zip(flat_req, flat_bonus)]
            q.scatter_(1, d_col, _upload(one_hot, probs.dtype, device).unsqueeze(1))
            q_rows: list[int] = []
            q_parts: list[torch.Tensor] = []
            for r in with_q:
                qr = draft_probs[r]
                assert qr is not None
                if qr.dim() != 2 or qr.shape[0] < ks[r] or qr.shape[1] != logits.shape[1]:
                    raise ValueError(f"draft_probs[{r}] has shape {tuple(qr.shape)}, needs [>= {ks[r]}, "
                                     f"{logits.shape[1]}]")
                first = padded[r][0]
                q_rows.extend(range(first, first + ks[r]))
                q_parts.append(qr.narrow(0, 0, ks[r]).to(probs.dtype))
            q.index_put_((_upload(q_rows, torch.int64, device),), torch.cat(q_parts))
            q_d = q.gather(1, d_col).squeeze(1)
            residual = (probs - q).clamp_(min=0.0)  # bonus rows: q == 0, so p itself
        u_accept, u_draw = u.unbind(1)
        drawn, total = inverse_cdf(residual, u_draw)
        accept_s = (u_accept * q_d < p_d) | (total <= 0)  # probability min(1, p(d) / q(d))
        accept = torch.where(greedy_row, accept, accept_s)
        replace = torch.where(greedy_row, argmax, drawn)

    cols = torch.arange(k_max + 1, device=device)
    acc = accept.take(pad_idx) & (cols < num_drafts)  # [R, k_max + 1]: accepted drafts (and later ones)
    num_accepted = acc.to(torch.int64).cumprod(dim=-1).sum(dim=-1)  # [R]
    n = num_accepted.unsqueeze(1)
    out = torch.where(cols < n, drafts.take(pad_idx), torch.where(cols == n, replace.take(pad_idx), -1))
    return VerifyOutput(out, num_accepted)


def verify(logits: torch.Tensor, draft: list[int], req: SamplingState, generator: torch.Generator | None,
           draft_probs: torch.Tensor | None = None) -> list[int]:
    """One request (compatibility with the old ``spec_decode.verify``): the tokens to append, on the host.
    ``logits`` [k+1, V]; ``draft_probs`` [k, V] the q rows of sampled drafts, None for deterministic ones."""
    return rejection_sample(logits, [draft], [req], [draft_probs], generator).to_lists()[0]


def draft_sample(logits: torch.Tensor, states: Sequence[SamplingState], step: int,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draft token ``step`` (0-based) of each row of ``logits`` [B, V]: the argmax for greedy states, else a
    sample from the filtered distribution q (the target's temperature / top-k / top-p / min-p), seeded rows
    from DRAFT_STREAM at step ``num_output_tokens + step``. Returns (tokens [B] int64, q [B, V]) on the logits'
    device, q None when every row is greedy; a greedy row's q is one-hot at its token. No sync."""
    device = logits.device
    tokens = logits.argmax(dim=-1)
    sps = [st.sampling_params for st in states]
    sampled = [not sp.greedy for sp in sps]
    if not any(sampled):
        return tokens, None
    probs = sampling_probs(logits, sps)
    u = row_uniforms(states, [step] * len(states), DRAFT_STREAM, 1, generator, device).squeeze(1)
    drawn, _ = inverse_cdf(probs, u)
    if all(sampled):
        return drawn, probs
    mask = _upload(sampled, torch.bool, device)
    tokens = torch.where(mask, drawn, tokens)
    one_hot = torch.zeros_like(probs).scatter_(1, tokens.unsqueeze(1), 1.0)
    return tokens, torch.where(mask.unsqueeze(1), probs, one_hot)
