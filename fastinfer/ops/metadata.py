"""Attention metadata: built once per step by the model runner, read by every attention layer."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """A packed batch of ``B`` sequences with ``T`` new tokens in all.

    Sequence ``i`` computes queries for its positions ``seq_lens[i] - query_lens[i] .. seq_lens[i] - 1``;
    their keys and values are already in the paged cache (``store_kv`` runs first), as are all earlier
    positions. Decode rows (``query_len == 1``) come first: ``num_decodes`` of them.
    """

    query_start_loc: torch.Tensor  # [B + 1] int32, offsets into the packed tokens
    seq_lens: torch.Tensor  # [B] int32, context length including this step's tokens
    block_table: torch.Tensor  # [B, max_blocks] int32, padded with 0
    slot_mapping: torch.Tensor  # [T] int64, cache slot of each new token (block * block_size + offset)
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    num_decodes: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_cpu, default=0)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_cpu, default=0)

    @classmethod
    def build(cls, query_lens: list[int], seq_lens: list[int], block_ids: list[list[int]], block_size: int,
              device: torch.device | str = "cpu") -> AttentionMetadata:
        """From host lists; decode rows must already come first."""
        num_decodes = 0
        while num_decodes < len(query_lens) and query_lens[num_decodes] == 1:
            num_decodes += 1
        qsl = [0]
        for q in query_lens:
            qsl.append(qsl[-1] + q)
        width = max((len(b) for b in block_ids), default=1)
        table = [b + [0] * (width - len(b)) for b in block_ids]
        slots: list[int] = []
        for q, s, blocks in zip(query_lens, seq_lens, block_ids):
            for pos in range(s - q, s):
                slots.append(blocks[pos // block_size] * block_size + pos % block_size)
        return cls(
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_table=torch.tensor(table, dtype=torch.int32, device=device).reshape(len(block_ids), width),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            query_lens_cpu=list(query_lens),
            seq_lens_cpu=list(seq_lens),
            num_decodes=num_decodes,
        )
