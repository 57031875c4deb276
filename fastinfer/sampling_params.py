"""Sampling parameters of one request, shaped like vLLM's ``SamplingParams`` and validated on creation."""
from __future__ import annotations

import json as _json
import math
from dataclasses import dataclass, field
from typing import Any

# Hard bounds on user-controlled sizes (the server applies its own, possibly lower, limits).
MAX_N = 128
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 256
MAX_GRAMMAR_CHARS = 64 * 1024  # a JSON schema (serialised), regex or EBNF grammar
MAX_CHOICES = 256
MAX_CHOICE_LEN = 1024
MAX_LOGIT_BIAS = 1024  # entries
MAX_ALLOWED_TOKEN_IDS = 1 << 18
MAX_BAD_WORDS = 64
MAX_BAD_WORD_LEN = 256


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class StructuredOutputsParams:
    """Constrain the output to a grammar (vLLM's ``StructuredOutputsParams``): exactly one of ``json`` (a JSON
    schema, as a dict or its JSON text), ``json_object`` (any JSON object), ``regex``, ``choice`` (one of these
    strings) or ``grammar`` (EBNF, the GBNF dialect of llama.cpp / xgrammar). Sizes are bounded here; whether the
    schema, regex or grammar is valid is checked when the engine takes the request (a ``ValueError`` naming the
    problem)."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False  # JSON: no whitespace between tokens (compact output)
    # the grammar applies only once the output has produced this text (the end of a reasoning block, e.g.
    # "</think>": the server sets it when its --reasoning-parser says the output starts inside one)
    reasoning_end: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        if self.json_object:
            given.append("json_object")
        if len(given) != 1:
            raise ValueError("StructuredOutputsParams needs exactly one of json, json_object, regex, choice, "
                             f"grammar; got {given or 'none'}")
        if self.json is not None:
            if isinstance(self.json, dict):
                text = _json.dumps(self.json)
            elif isinstance(self.json, str):
                text = self.json
            else:
                raise ValueError(f"structured_outputs.json must be a JSON schema (dict or JSON text), got "
                                 f"{type(self.json).__name__}")
            _check_len("json", text)
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None:
                if not isinstance(v, str) or not v:
                    raise ValueError(f"structured_outputs.{name} must be a non-empty string")
                _check_len(name, v)
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")
            if len(self.choice) > MAX_CHOICES or any(len(c) > MAX_CHOICE_LEN for c in self.choice):
                raise ValueError(f"structured_outputs.choice allows at most {MAX_CHOICES} strings of at most "
                                 f"{MAX_CHOICE_LEN} characters")
            self.choice = list(self.choice)
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise ValueError("structured_outputs.json_object must be a bool")
        if not isinstance(self.disable_any_whitespace, bool):
            raise ValueError("structured_outputs.disable_any_whitespace must be a bool")
        if self.reasoning_end is not None and (not isinstance(self.reasoning_end, str) or not self.reasoning_end
                                               or len(self.reasoning_end) > 64):
            raise ValueError("structured_outputs.reasoning_end must be a non-empty string of at most 64 characters")

    @property
    def kind(self) -> str:
        """Which constraint: "json", "json_object", "regex", "choice" or "grammar"."""
        if self.json_object:
            return "json_object"
        return next(k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None)

    def key(self) -> tuple[str, str, bool]:
        """(kind, canonical text, compact): equal keys compile to the same grammar (the compile cache's key)."""
        kind = self.kind
        if kind == "json":
            text = self.json if isinstance(self.json, str) else _json.dumps(self.json, sort_keys=True)
        elif kind == "json_object":
            text = ""
        elif kind == "choice":
            text = _json.dumps(self.choice)
        else:
            text = getattr(self, kind)
        return kind, text, self.disable_any_whitespace


def _check_len(name: str, text: str) -> None:
    if len(text) > MAX_GRAMMAR_CHARS:
        raise ValueError(f"structured_outputs.{name} is {len(text)} characters; at most {MAX_GRAMMAR_CHARS} "
                         "are accepted")


@dataclass
class SamplingParams:
    """How to sample the completion of one prompt.

    ``temperature == 0`` is greedy. ``top_k`` of 0 or -1 and ``top_p == 1`` and ``min_p == 0`` switch those
    filters off. ``best_of > n`` generates ``best_of`` samples and returns the ``n`` with the highest
    cumulative log-probability (outputs only when finished). ``seed`` makes the sample a pure function of
    (seed, sample index, step): the same whatever other requests share the batch, and across preemption.
    ``stop`` strings never appear in the output text (unless ``include_stop_str_in_output``). ``logprobs=k``
    returns the sampled token's log-probability and the top-k alternatives per generated token (raw model
    distribution, as vLLM does). ``prompt_logprobs=k`` returns, per prompt position after the first, the
    log-probability of the prompt token given the tokens before it and the top-k alternatives (requests that
    ask for it do not read the prefix cache, so every position is computed).

    ``structured_outputs`` constrains the output to a grammar (:class:`StructuredOutputsParams`). ``logit_bias``
    adds a bias in [-100, 100] to the logits of token ids, ``allowed_token_ids`` restricts sampling to those ids,
    ``bad_words`` bans words (the engine tokenizes them, with and without a leading space, into
    ``bad_words_token_ids``; the last token of a word is banned when the tokens before it were just generated).
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
    structured_outputs: StructuredOutputsParams | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    bad_words_token_ids: list[list[int]] | None = None  # set by the engine from ``bad_words``
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
        self._validate_logit_rules()

    def _validate_logit_rules(self) -> None:
        if self.structured_outputs is not None:
            if isinstance(self.structured_outputs, dict):
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise ValueError("SamplingParams.structured_outputs must be a StructuredOutputsParams")
        if self.logit_bias is not None:
            lb = self.logit_bias
            if not isinstance(lb, dict) or len(lb) > MAX_LOGIT_BIAS:
                raise ValueError(f"SamplingParams.logit_bias must be a dict of at most {MAX_LOGIT_BIAS} token ids")
            clean: dict[int, float] = {}
            for k, v in lb.items():
                tid = int(k) if isinstance(k, str) and k.strip().lstrip("-").isdigit() else k
                if not _is_int(tid) or tid < 0:
                    raise ValueError(f"SamplingParams.logit_bias keys must be token ids (integers >= 0), got {k!r}")
                if not _is_real(v) or not math.isfinite(v) or not -100 <= v <= 100:
                    raise ValueError(f"SamplingParams.logit_bias[{k}] must be a number in [-100, 100], got {v!r}")
                clean[tid] = float(v)
            self.logit_bias = clean
        if self.allowed_token_ids is not None:
            a = self.allowed_token_ids
            if (not isinstance(a, (list, tuple)) or not a or len(a) > MAX_ALLOWED_TOKEN_IDS
                    or not all(_is_int(t) and t >= 0 for t in a)):
                raise ValueError("SamplingParams.allowed_token_ids must be a non-empty list of token ids "
                                 f"(at most {MAX_ALLOWED_TOKEN_IDS})")
            self.allowed_token_ids = list(a)
        if self.bad_words is not None:
            w = self.bad_words
            if (not isinstance(w, (list, tuple)) or len(w) > MAX_BAD_WORDS
                    or not all(isinstance(x, str) and x and len(x) <= MAX_BAD_WORD_LEN for x in w)):
                raise ValueError(f"SamplingParams.bad_words must be a list of at most {MAX_BAD_WORDS} non-empty "
                                 f"strings of at most {MAX_BAD_WORD_LEN} characters")
            self.bad_words = list(w)

    @property
    def num_samples(self) -> int:
        """Sequences generated: ``best_of`` (the ``n`` with the highest cumulative logprob are returned)."""
        return self.best_of or self.n

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def check_token_ids(self, vocab_size: int) -> None:
        """The token ids of ``logit_bias`` and ``allowed_token_ids`` lie in the vocabulary ``[0, vocab_size)``
        (the one check, by the engine at admission and by the server before it answers 400)."""
        rules = {"logit_bias": list(self.logit_bias or ()), "allowed_token_ids": self.allowed_token_ids or []}
        for name, ids in rules.items():
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise ValueError(f"SamplingParams.{name} has token ids outside the vocabulary [0, {vocab_size}): "
                                 f"{bad[:5]}")

    @property
    def needs_logit_rules(self) -> bool:
        """Whether logit_bias, allowed_token_ids or bad words change this request's logits."""
        return bool(self.logit_bias or self.allowed_token_ids or self.bad_words_token_ids)

    @property
    def needs_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)
