"""A request as the scheduler sees it: token ids and how many of them have KV computed."""
from __future__ import annotations

import enum
import time

from fastinfer.core.kv_cache_utils import extend_block_hashes
from fastinfer.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort", "error")


class Request:
    """One sequence being generated (a prompt with ``n`` samples becomes ``n`` of these).

    The one rule the scheduler follows: each step moves ``num_computed_tokens`` toward ``num_tokens``
    (prompt + output). Prefill, chunked prefill, prefix-cache hits and recompute after preemption are all
    that rule; a request samples a new token when its computed tokens catch up with its total.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 eos_token_ids: tuple[int, ...] = (), sample_index: int = 0, cache_salt: str | None = None,
                 arrival_time: float | None = None) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        self.sample_index = sample_index
        self.cache_salt = cache_salt
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at first schedule
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        self.block_hashes: list[bytes] = []
        self.cacheable = True  # False once its forward produced non-finite values
        self.spec_token_ids: list[int] = []  # draft tokens to verify in the next step
        self.spec_acceptance = 1.0  # moving average of the fraction of drafts accepted

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_tokens_with_spec(self) -> int:
        return len(self.all_token_ids) + len(self.spec_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def update_block_hashes(self, block_size: int) -> None:
        """Extend the hash chain over every full block of tokens known so far."""
        extend_block_hashes(self.block_hashes, self.all_token_ids, block_size, self.cache_salt)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
                f"{self.status.name})")
