"""Turn logits into tokens: penalties, greedy or temperature / top-k / top-p / min-p sampling, logprobs.

Everything runs on the logits' device and nothing here synchronises with it: which rows need penalties,
filters, seeds or logprobs is decided from the host-side :class:`SamplingParams`, per-row values travel as
small tensors (pinned, non-blocking copies), and the functions return device tensors. The caller does the
step's single device-to-host copy (:meth:`SamplerOutput.to_lists`).

Random numbers are counter-based: a uniform is a pure function of (seed, sample index, step, stream, column),
computed with 64-bit integer arithmetic (splitmix64) that gives the same bits on every device. A seeded row's
sample therefore depends only on its own logits and seed: not on batch mates, batch order, preemption or the
device's random generator. Unseeded rows draw a random 63-bit key per row from a ``torch.Generator`` (the one
passed in, else the device's default generator) and go through the same function.

A token is drawn by inverting the CDF of its row (float64 cumulative sum, one uniform per row): exact to the
rounding of the probabilities, and each row is computed independently of the others.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from fastinfer.sampling_params import SamplingParams

# Stream ids: independent random streams for one (seed, sample index, step).
SAMPLE_STREAM = 0  # plain sampling
VERIFY_STREAM = 1  # speculative verification (acceptance test, residual / bonus draw)
DRAFT_STREAM = 2  # draft-model sampling

_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1


def _i64(x: int) -> int:
    """The int64 (two's complement) value with the low 64 bits of ``x``."""
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


_GOLDEN = 0x9E3779B97F4A7C15
_C1 = 0xBF58476D1CE4E5B9
_C2 = 0x94D049BB133111EB
_GOLDEN_I64, _C1_I64, _C2_I64 = _i64(_GOLDEN), _i64(_C1), _i64(_C2)


class SamplingState(Protocol):
    """What sampling reads of a request (``fastinfer.core.request.Request`` has all of it)."""

    @property
    def sampling_params(self) -> SamplingParams: ...
    @property
    def sample_index(self) -> int: ...
    @property
    def num_output_tokens(self) -> int: ...
    @property
    def output_token_ids(self) -> Sequence[int]: ...
    @property
    def prompt_token_ids(self) -> Sequence[int]: ...
    @property
    def eos_token_ids(self) -> Sequence[int]: ...


# -- counter-based random numbers ---------------------------------------------------------------------------
def mix_seed(*parts: int) -> int:
    """A 63-bit key from several integers (splitmix64 steps). :func:`uniform_noise` computes the same
    function on tensors, so ``mix_seed(seed, sample_index, step, stream)`` is the key of that row."""
    x = _GOLDEN
    for p in parts:
        x = (x ^ (p & _MASK64)) & _MASK64
        x = (x + _GOLDEN) & _MASK64
        x = ((x ^ (x >> 30)) * _C1) & _MASK64
        x = ((x ^ (x >> 27)) * _C2) & _MASK64
        x ^= x >> 31
    return x & _MASK63


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic: mask the sign copies)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _finalize(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's output function on int64 tensors (multiplication wraps modulo 2^64)."""
    z = (z ^ _srl(z, 30)) * _C1_I64
    z = (z ^ _srl(z, 27)) * _C2_I64
    return z ^ _srl(z, 31)


def uniform_noise(seeds: torch.Tensor, sample_index: torch.Tensor | int, step: torch.Tensor | int,
                  stream: torch.Tensor | int, columns: int, device: torch.device | str | None = None,
                  ) -> torch.Tensor:
    """Uniforms in (0, 1), float64 [R, columns]: entry (r, c) is a pure function of (seeds[r],
    sample_index[r], step[r], stream[r], c), the same bits on any device and whatever the other rows are.

    ``seeds`` is an int64 tensor [R]; the counters are int64 tensors [R] or Python ints (same for all rows).
    The row key is :func:`mix_seed` of the four; column c is output c+1 of a splitmix64 generator from that
    key; its top 53 bits give (k + 0.5) / 2^53."""
    dev = seeds.device if device is None else torch.device(device)
    x = torch.full(seeds.shape, _GOLDEN_I64, dtype=torch.int64, device=dev)
    for p in (seeds, sample_index, step, stream):
        part = p.to(device=dev, dtype=torch.int64) if isinstance(p, torch.Tensor) else _i64(p)
        x = _finalize((x ^ part) + _GOLDEN_I64)
    key = x & _MASK63  # [R], == mix_seed(...)
    cols = (torch.arange(1, columns + 1, dtype=torch.int64, device=dev) * _GOLDEN_I64)  # [C], wraps
    z = _finalize(key.unsqueeze(1) + cols)  # [R, C]
    return (_srl(z, 11).to(torch.float64) + 0.5) * (2.0 ** -53)


def _upload(data: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a tensor on ``device``: a pinned, non-blocking copy (no synchronisation)."""
    t = torch.tensor(data, dtype=dtype)
    if device.type == "cpu":
        return t
    if device.type == "cuda" and torch.cuda.is_available():
        t = t.pin_memory()
    return t.to(device=device, non_blocking=True)


def _random_keys(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """[n] random non-negative int64 keys on ``device`` from ``generator`` (default: the device's own).
    A generator on another device (e.g. a CPU one with CUDA logits) draws there; the keys are copied over."""
    gen_dev = device if generator is None else generator.device
    keys = torch.empty(n, dtype=torch.int64, device=gen_dev).random_(generator=generator)
    if gen_dev == device:
        return keys
    if gen_dev.type == "cpu" and device.type == "cuda" and torch.cuda.is_available():
        keys = keys.pin_memory()
    return keys.to(device=device, non_blocking=True)


def row_uniforms(states: Sequence[SamplingState], offsets: Sequence[int], stream: int, columns: int,
                 generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """float64 [len(states), columns] uniforms, row i at step ``states[i].num_output_tokens + offsets[i]``:
    counter-based from the seed for seeded rows, from a random key (``generator``) for the others."""
    seeds_or_none = [st.sampling_params.seed for st in states]
    seeded = [s is not None for s in seeds_or_none]
    host = [[0 if s is None else _i64(s) for s in seeds_or_none],
            [st.sample_index for st in states],
            [st.num_output_tokens + off for st, off in zip(states, offsets)],
            [int(s) for s in seeded]]
    seeds, index, step, is_seeded = _upload(host, torch.int64, device).unbind(0)
    if not all(seeded):
        keys = _random_keys(len(states), generator, device)
        seeds = keys if not any(seeded) else torch.where(is_seeded.bool(), seeds, keys)
    return uniform_noise(seeds, index, step, stream, columns, device)


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of non-negative ``weights`` [R, V] (unnormalised), from uniforms ``u`` [R] in (0, 1):
    the first index whose float64 cumulative weight reaches ``u * total``. Returns (tokens [R] int64, total
    [R] float64); a row with total 0 (or NaN) gives an arbitrary in-range token."""
    cdf = weights.to(torch.float64).cumsum(dim=-1)  # [R, V]
    total = cdf.select(1, -1)
    x = (u.to(torch.float64) * total).unsqueeze(1)  # [R, 1]; <= total, > 0 where total > 0
    tokens = torch.searchsorted(cdf, x).squeeze(1)  # left side: a zero-weight token is never chosen
    return tokens.clamp_(max=weights.shape[1] - 1), total


# -- penalties and filters ----------------------------------------------------------------------------------
def apply_penalties(logits: torch.Tensor, states: Sequence[SamplingState]) -> None:
    """In place: min_tokens (EOS / stop ids banned until enough tokens exist), bad words, allowed_token_ids and
    logit_bias, then repetition (prompt + output tokens), frequency and presence (output tokens) penalties.
    Vectorised over rows; no synchronisation."""
    vocab = logits.shape[1]
    device = logits.device
    ban_rows: list[int] = []
    ban_cols: list[int] = []
    pen_rows: list[int] = []
    for i, st in enumerate(states):
        sp = st.sampling_params
        if st.num_output_tokens < sp.min_tokens:
            eos = () if sp.ignore_eos else st.eos_token_ids
            for t in itertools.chain(sp.stop_token_ids or (), eos):
                if 0 <= t < vocab:
                    ban_rows.append(i)
                    ban_cols.append(t)
        if sp.needs_penalties:
            pen_rows.append(i)
        if sp.bad_words_token_ids:
            for t in _banned_bad_words(sp.bad_words_token_ids, st.output_token_ids):
                if 0 <= t < vocab:
                    ban_rows.append(i)
                    ban_cols.append(t)
    if ban_rows:
        rows, cols = _upload([ban_rows, ban_cols], torch.int64, device).unbind(0)
        logits.index_put_((rows, cols), torch.full((), float("-inf"), dtype=logits.dtype, device=device))
    _apply_bias_and_allowed(logits, states)
    if pen_rows:
        _penalize(logits, states, pen_rows)


def _banned_bad_words(words: Sequence[Sequence[int]], output: Sequence[int]) -> list[int]:
    """The last token of each bad word whose other tokens are the last tokens generated (a one-token word is
    always banned), as vLLM applies ``bad_words`` to the generated tokens."""
    banned = []
    for w in words:
        k = len(w) - 1
        if k == 0 or (len(output) >= k and list(output[len(output) - k:]) == list(w[:k])):
            banned.append(w[-1])
    return banned


def _apply_bias_and_allowed(logits: torch.Tensor, states: Sequence[SamplingState]) -> None:
    """In place: ``allowed_token_ids`` (every other token -inf) and ``logit_bias`` (added), one scatter each."""
    vocab, device = logits.shape[1], logits.device
    allow_rows, allow_cols, bias_rows, bias_cols, bias_vals = [], [], [], [], []
    for i, st in enumerate(states):
        sp = st.sampling_params
        for t in sp.allowed_token_ids or ():
            if t < vocab:
                allow_rows.append(i)
                allow_cols.append(t)
        for t, b in (sp.logit_bias or {}).items():
            if t < vocab:
                bias_rows.append(i)
                bias_cols.append(t)
                bias_vals.append(b)
    if allow_rows:
        restricted = sorted(set(allow_rows))
        banned = torch.zeros(logits.shape, dtype=torch.bool, device=device)
        banned.index_fill_(0, _upload(restricted, torch.int64, device), True)
        rows, cols = _upload([allow_rows, allow_cols], torch.int64, device).unbind(0)
        banned.index_put_((rows, cols), torch.zeros((), dtype=torch.bool, device=device))
        logits.masked_fill_(banned, float("-inf"))
    if bias_rows:
        rows, cols = _upload([bias_rows, bias_cols], torch.int64, device).unbind(0)
        logits.index_put_((rows, cols), _upload(bias_vals, logits.dtype, device), accumulate=True)


def _token_table(lists: Sequence[Sequence[int]], vocab: int, device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
    """Counts [len(lists), vocab] of the tokens of each list (out-of-range ids ignored)."""
    lens = [len(t) for t in lists]
    total = sum(lens)
    width = vocab + 1  # column ``vocab`` takes the out-of-range ids
    counts = torch.zeros(len(lists) * width, dtype=dtype, device=device)
    if total:
        host = list(itertools.chain(itertools.chain.from_iterable(lists), lens))
        toks, lens_t = _upload(host, torch.int64, device).split([total, len(lists)])  # one copy for both
        rows = torch.repeat_interleave(torch.arange(len(lists), device=device), lens_t, output_size=total)
        cols = torch.where((toks >= 0) & (toks < vocab), toks, vocab)
        counts.scatter_add_(0, rows * width + cols, torch.ones(total, dtype=dtype, device=device))
    return counts.view(len(lists), width).narrow(1, 0, vocab)


def _penalize(logits: torch.Tensor, states: Sequence[SamplingState], rows: list[int]) -> None:
    vocab = logits.shape[1]
    device = logits.device
    sps = [states[i].sampling_params for i in rows]
    all_rows = rows == list(range(logits.shape[0]))
    row_t = None if all_rows else _upload(rows, torch.int64, device)
    sub = logits if row_t is None else logits.index_select(0, row_t)  # [P, V]
    counts = _token_table([states[i].output_token_ids for i in rows], vocab, device, logits.dtype)  # [P, V]
    rp, fp, pp = _upload([[sp.repetition_penalty, sp.frequency_penalty, sp.presence_penalty] for sp in sps],
                         logits.dtype, device).split(1, dim=1)  # [P, 1] each
    if any(sp.repetition_penalty != 1.0 for sp in sps):
        prompts = [states[i].prompt_token_ids if sp.repetition_penalty != 1.0 else () for i, sp in zip(rows, sps)]
        seen = (counts > 0) | (_token_table(prompts, vocab, device, logits.dtype) > 0)
        sub = torch.where(seen, torch.where(sub > 0, sub / rp, sub * rp), sub)
    if any(sp.frequency_penalty for sp in sps):
        sub = sub - fp * counts
    if any(sp.presence_penalty for sp in sps):
        sub = sub - pp * (counts > 0).to(sub.dtype)
    if row_t is None:
        if sub is not logits:
            logits.copy_(sub)
    else:
        logits.index_put_((row_t,), sub)


def _filter_params(sps: Sequence[SamplingParams], vocab: int, greedy_one_hot: bool,
                   ) -> tuple[list[list[float]], bool, bool]:
    """Per row (temperature, top_k, top_p, min_p) and whether any row needs the sort (top-k / top-p) or min-p.
    Greedy rows: one-hot at the argmax (``greedy_one_hot``) or neutral (the caller ignores them)."""
    rows: list[list[float]] = []
    need_sort = need_min_p = False
    for sp in sps:
        if sp.greedy:
            need_sort |= greedy_one_hot
            rows.append([1.0, 1.0 if greedy_one_hot else float(vocab), 1.0, 0.0])
            continue
        k = sp.top_k if 0 < sp.top_k < vocab else vocab
        need_sort |= k < vocab or sp.top_p < 1.0
        need_min_p |= sp.min_p > 0.0
        rows.append([sp.temperature, float(k), sp.top_p, sp.min_p])
    return rows, need_sort, need_min_p


def _filtered_probs(logits: torch.Tensor, params: torch.Tensor, need_sort: bool, need_min_p: bool,
                    ) -> torch.Tensor:
    """Softmax after temperature, top-k, top-p and min-p; ``params`` [S, 4] on the logits' device."""
    vocab = logits.shape[1]
    temperature, top_k, top_p, min_p = params.split(1, dim=1)  # [S, 1] each
    sub = logits / temperature
    if need_sort:
        sorted_l, idx = sub.sort(dim=-1, descending=True, stable=True)  # ties: lowest id first, like argmax
        ranks = torch.arange(vocab, device=logits.device)
        drop = ranks >= top_k
        probs = sorted_l.softmax(dim=-1)
        drop |= (probs.cumsum(dim=-1) - probs) >= top_p  # keep the smallest set reaching top_p
        drop.select(1, 0).fill_(False)
        sub = torch.empty_like(sub).scatter_(1, idx, sorted_l.masked_fill(drop, float("-inf")))
    if need_min_p:
        probs = sub.softmax(dim=-1)
        sub = sub.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return sub.softmax(dim=-1)


def filtered_probs(logits: torch.Tensor, sps: Sequence[SamplingParams]) -> torch.Tensor:
    """Probabilities after temperature, top-k, top-p and min-p, one row per params, on the logits' device.
    A greedy row is one-hot at its argmax."""
    rows, need_sort, need_min_p = _filter_params(sps, logits.shape[1], greedy_one_hot=True)
    return _filtered_probs(logits, _upload(rows, torch.float32, logits.device), need_sort, need_min_p)


def sampling_probs(logits: torch.Tensor, sps: Sequence[SamplingParams]) -> torch.Tensor:
    """Like :func:`filtered_probs` but greedy rows are left unfiltered (for callers that take the argmax
    there): a batch of greedy and sampled rows needs the sort only if a sampled row does."""
    rows, need_sort, need_min_p = _filter_params(sps, logits.shape[1], greedy_one_hot=False)
    return _filtered_probs(logits, _upload(rows, torch.float32, logits.device), need_sort, need_min_p)


# -- sampling -----------------------------------------------------------------------------------------------
@dataclass
class SampledTokens:
    """Host-side result of one sampling step."""

    token_ids: list[int]
    logprob: list[float | None]  # of the sampled token, when asked for
    top_logprobs: list[dict[int, float] | None]  # sampled token + top-k alternatives, when asked for


@dataclass
class SamplerOutput:
    """Device tensors of one sampling step; :meth:`to_lists` copies them to the host in one transfer."""

    token_ids: torch.Tensor  # [S] int64
    logprob: torch.Tensor | None  # [S] raw log-softmax of the sampled token (None: no row asked)
    top_ids: torch.Tensor | None  # [S, K] int64, K = the most alternatives a row asked for (None: K == 0)
    top_logprobs: torch.Tensor | None  # [S, K]
    num_logprobs: list[int | None]  # host: per row, the alternatives asked for (None: no logprobs)

    def to_lists(self) -> SampledTokens:
        """The one synchronisation of the step: everything in a single device-to-host copy."""
        s = self.token_ids.shape[0]
        if self.logprob is None:
            return SampledTokens(self.token_ids.tolist(), [None] * s, [None] * s)
        parts = [self.token_ids[:, None].to(torch.float64), self.logprob[:, None].to(torch.float64)]
        if self.top_ids is not None and self.top_logprobs is not None:
            parts += [self.top_ids.to(torch.float64), self.top_logprobs.to(torch.float64)]
        rows = torch.cat(parts, dim=1).tolist()  # ids < 2^53 and float32 values are exact in float64
        width = 0 if self.top_ids is None else self.top_ids.shape[1]
        tokens = [int(r[0]) for r in rows]
        logprob: list[float | None] = [None] * s
        top: list[dict[int, float] | None] = [None] * s
        for i, (row, k) in enumerate(zip(rows, self.num_logprobs)):
            if k is None:
                continue
            logprob[i] = row[1]
            k = min(k, width)
            d = {tokens[i]: row[1]}
            d.update(zip((int(t) for t in row[2:2 + k]), row[2 + width:2 + width + k]))
            top[i] = d
        return SampledTokens(tokens, logprob, top)


def sample(logits: torch.Tensor, states: Sequence[SamplingState], generator: torch.Generator | None = None,
           argmax: Callable[[torch.Tensor], torch.Tensor] | None = None) -> SamplerOutput:
    """Sample one token per row of ``logits`` [S, V] (fp32) for ``states[i]``: device tensors, no sync.
    ``generator`` draws the keys of unseeded rows (default: the logits device's default generator); ``argmax``
    takes the greedy tokens (the op set's ``argmax``; default ``torch.argmax``)."""
    s, vocab = logits.shape
    device = logits.device
    sps = [st.sampling_params for st in states]
    raw = logits
    if any(sp.needs_penalties or sp.needs_logit_rules or st.num_output_tokens < sp.min_tokens
           for sp, st in zip(sps, states)):
        logits = logits.clone()
        apply_penalties(logits, states)
    tokens = argmax(logits) if argmax is not None else logits.argmax(dim=-1)
    sampled = [not sp.greedy for sp in sps]
    if any(sampled):
        probs = sampling_probs(logits, sps)
        u = row_uniforms(states, [0] * s, SAMPLE_STREAM, 1, generator, device).squeeze(1)
        drawn, _ = inverse_cdf(probs, u)
        tokens = drawn if all(sampled) else torch.where(_upload(sampled, torch.bool, device), drawn, tokens)
    asked = [sp.logprobs for sp in sps]
    logprob = top_ids = top_vals = None
    if any(k is not None for k in asked):
        lps = raw.log_softmax(dim=-1)
        logprob = lps.gather(1, tokens.unsqueeze(1)).squeeze(1)
        k_max = max(k for k in asked if k is not None)
        if k_max:
            top_vals, top_ids = lps.topk(min(k_max, vocab), dim=-1)
    return SamplerOutput(tokens, logprob, top_ids, top_vals, asked)
