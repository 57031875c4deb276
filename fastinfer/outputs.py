"""What generation returns, shaped like vLLM's ``RequestOutput`` / ``CompletionOutput``."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One sample. ``logprobs`` (when asked for) holds, per generated token, a dict token id -> Logprob of
    the sampled token and the top alternatives."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """All samples of one prompt. ``error`` is set (and ``finished``) when the request was rejected."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    error: str | None = None
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    # with SamplingParams.prompt_logprobs: per prompt position, the prompt token's logprob and the top-k
    # alternatives (token id -> Logprob); None at position 0, which has no context
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
