"""The worker's own view of each request (built from :class:`fastinfer.core.outputs.NewRequestData` and kept up
to date from what the worker samples), and the one input-packing helper shared by the model runner and the
draft proposer."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fastinfer.core.kv_cache_utils import extend_block_hashes
from fastinfer.core.outputs import NewRequestData
from fastinfer.ops import AttentionMetadata
from fastinfer.sampling_params import SamplingParams


class CachedRequestState:
    """Tokens, sampling parameters and speculation statistics of one request, as the worker knows them. It
    has the attribute names of :class:`fastinfer.core.request.Request` that the sampler and the proposers
    read, so both take either."""

    def __init__(self, new: NewRequestData) -> None:
        self.request_id = new.req_id
        self.prompt_token_ids = list(new.prompt_token_ids)
        self.output_token_ids = list(new.output_token_ids)
        self.all_token_ids = self.prompt_token_ids + self.output_token_ids
        self.sampling_params: SamplingParams = new.sampling_params
        self.sample_index = new.sample_index
        self.eos_token_ids = new.eos_token_ids
        self.cache_salt = new.cache_salt
        self.num_preemptions = 0  # a resumed request is a new state object
        self.num_computed_tokens = 0
        self.block_hashes: list[bytes] = []
        self.spec_acceptance = 1.0  # moving average of the fraction of drafts accepted
        self.is_finished = False  # set when the worker drops it (proposers prune on it)
        self.grammar: Any = None  # structured outputs: its GrammarState

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def append_output_tokens(self, tokens: list[int]) -> None:
        self.output_token_ids.extend(tokens)
        self.all_token_ids.extend(tokens)

    def update_block_hashes(self, block_size: int) -> None:
        """Extend the hash chain over every full block of known tokens (the scheduler's chain, recomputed)."""
        extend_block_hashes(self.block_hashes, self.all_token_ids, block_size, self.cache_salt)


@dataclass
class Chunk:
    """Tokens of one sequence to run this forward, from position ``start``, cached in ``block_ids`` (a list, or
    one list per KV cache group)."""

    token_ids: list[int]
    start: int
    block_ids: list[int] | tuple[list[int], ...]


@dataclass
class PackedInputs:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    last_rows: list[int]  # row of each chunk's last token, in the caller's chunk order
    first_rows: list[int] = field(default_factory=list)  # row of each chunk's first token


def pack_inputs(chunks: list[Chunk], block_size: int, device: torch.device,
                group_of_window: Mapping[int | None, int] | None = None) -> PackedInputs:
    """One packed varlen batch of ``chunks``, decode rows (one token) first as the attention backends expect.
    Token ids, positions and the attention metadata reach the device in one host-to-device copy; with several
    KV cache groups, ``group_of_window`` maps a layer's sliding window to its group (see
    :meth:`AttentionMetadata.for_window`)."""
    order = sorted(range(len(chunks)), key=lambda j: len(chunks[j].token_ids) != 1)
    input_ids: list[int] = []
    query_lens, seq_lens, tables = [], [], []
    last_rows = [0] * len(chunks)
    first_rows = [0] * len(chunks)
    for j in order:
        c = chunks[j]
        first_rows[j] = len(input_ids)
        input_ids.extend(c.token_ids)
        query_lens.append(len(c.token_ids))
        seq_lens.append(c.start + len(c.token_ids))
        tables.append(c.block_ids)
        last_rows[j] = len(input_ids) - 1
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, block_size, device, input_ids=input_ids,
                                   group_of_window=group_of_window)
    assert meta.input_ids is not None and meta.positions is not None
    return PackedInputs(meta.input_ids, meta.positions, meta, last_rows, first_rows)
