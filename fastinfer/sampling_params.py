"""Sampling parameters of one request, shaped like vLLM's ``SamplingParams`` and validated on creation."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# Hard bounds on user-controlled sizes (the server applies its own, possibly lower, limits).
MAX_N = 128
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 256


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    """How to sample the completion of one prompt.

    ``temperature == 0`` is greedy. ``top_k`` of 0 or -1 and ``top_p == 1`` and ``min_p == 0`` switch those
    filters off. ``best_of > n`` generates ``best_of`` samples and returns the ``n`` with the highest
    cumulative log-probability (outputs only when finished). ``seed`` makes the sample a pure function of
    (seed, sample index, step): the same whatever other requests share the batch, and across preemption.
    ``stop`` strings never appear in the output text (unless ``include_stop_str_in_output``). ``logprobs=k``
    returns the sampled token's log-probability and the top-k alternatives per generated token (raw model
    distribution, as vLLM does).
    """

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stop_strings: list[str] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        self._validate()
        if self.stop is None:
            self.stop_strings = []
        elif isinstance(self.stop, str):
            self.stop_strings = [self.stop]
        else:
            self.stop_strings = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])

    def _validate(self) -> None:  # noqa: C901 - a flat list of checks reads best
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"SamplingParams.{name} {why}, got {getattr(self, name)!r}")

        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise bad("n", f"must be an integer in [1, {MAX_N}]")
        if self.best_of is not None and (not _is_int(self.best_of) or not self.n <= self.best_of <= MAX_N):
            raise bad("best_of", f"must be an integer in [n, {MAX_N}]")
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            v = getattr(self, name)
            if not _is_real(v) or not math.isfinite(v):
                raise bad(name, "must be a finite number")
        if self.temperature < 0:
            raise bad("temperature", "must be >= 0")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", "must be an integer >= -1 (0 or -1 disable it)")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if not -2 <= self.presence_penalty <= 2:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        if not 0 < self.repetition_penalty <= 10:
            raise bad("repetition_penalty", "must be in (0, 10]")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", "must be an integer or None")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", "must be an integer >= 1 or None")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                raise bad(name, f"must be an integer in [0, {MAX_LOGPROBS}] or None")
        if self.prompt_logprobs is not None:
            raise bad("prompt_logprobs", "is not supported yet")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if stops is not None:
            if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
                raise bad("stop", "must be a string or a list of strings")
            if len(stops) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_STRING_LEN for s in stops):
                raise bad("stop", f"must hold at most {MAX_STOP_STRINGS} non-empty strings of at most "
                                  f"{MAX_STOP_STRING_LEN} characters")
        if self.stop_token_ids is not None and (
                not isinstance(self.stop_token_ids, (list, tuple))
                or not all(_is_int(t) and t >= 0 for t in self.stop_token_ids)):
            raise bad("stop_token_ids", "must be a list of non-negative integers")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be a bool")

    @property
    def num_samples(self) -> int:
        """Sequences generated: ``best_of`` (the ``n`` with the highest cumulative logprob are returned)."""
        return self.best_of or self.n

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)
