"""The core <-> worker contract: plain data only (ids, token lists, block ids, frozen params), never live
``Request`` objects, so the worker can live in another process (tensor parallelism) and the scheduler's state
is written only by the scheduler."""
from __future__ import annotations

from dataclasses import dataclass, field

from fastinfer.sampling_params import SamplingParams


@dataclass(frozen=True)
class NewRequestData:
    """A request the worker has not seen yet, or sees again after a preemption (its KV was freed): everything
    the worker keeps about it. ``output_token_ids`` is non-empty when it resumes with tokens already generated."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    sample_index: int
    eos_token_ids: tuple[int, ...]
    cache_salt: str | None


@dataclass
class SchedulerOutput:
    """What to compute this step: ``num_scheduled_tokens[i]`` tokens of request ``req_ids[i]`` from position
    ``num_computed_tokens[i]``, into the blocks ``block_ids[i]`` (one list per KV cache group, see
    :mod:`fastinfer.core.kv_cache_manager`; they include any lookahead slots reserved for a draft model; in a
    sliding-window group, blocks wholly before the window are the group's null block, never read). Tokens past
    the request's known ones are the drafts ``spec_token_ids[req_id]``."""

    req_ids: list[str] = field(default_factory=list)
    num_scheduled_tokens: list[int] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)
    block_ids: list[tuple[list[int], ...]] = field(default_factory=list)
    new_reqs: list[NewRequestData] = field(default_factory=list)
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)  # drafts scheduled for verification
    preempted_req_ids: list[str] = field(default_factory=list)  # the worker drops their state
    finished_req_ids: list[str] = field(default_factory=list)  # ... and theirs (since the previous step)
    blocks_to_copy: list[tuple[int, int, int]] = field(default_factory=list)  # (group, src, dst), before the forward

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)

    def is_empty(self) -> bool:
        return not self.req_ids


@dataclass
class ModelRunnerOutput:
    """Per scheduled request that reached the end of its tokens: the sampled token ids (one, or several
    with speculation) and, when asked for, their logprobs; plus the drafts proposed for the next step."""

    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    num_rejected: dict[str, int] = field(default_factory=dict)  # drafts whose KV must be rolled back
    logprobs: dict[str, list[dict[int, float]]] = field(default_factory=dict)
    sampled_logprobs: dict[str, list[float]] = field(default_factory=dict)
    nonfinite_req_ids: set[str] = field(default_factory=set)  # produced NaN/inf: never cache their blocks
    draft_token_ids: dict[str, list[int]] = field(default_factory=dict)  # to verify next step
    draft_time_s: float = 0.0  # spent proposing this step
    # prompt logprobs of the chunks computed this step: req_id -> (first position, per position {token id:
    # (logprob, rank)}, the prompt token and its top-k alternatives)
    prompt_logprobs: dict[str, tuple[int, list[dict[int, tuple[float, int]]]]] = field(default_factory=dict)
