"""Embedding tables (token ids, learned absolute positions): uninitialised, filled by the checkpoint."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastinfer.distributed.communication import all_reduce
from fastinfer.distributed.parallel_state import tp_rank, tp_size
from fastinfer.distributed.sharding import materialize, narrow, vocab_shard


def embedding(num_embeddings: int, dim: int, dtype: torch.dtype) -> nn.Embedding:
    """An ``nn.Embedding`` [num_embeddings, dim] of ``dtype`` with uninitialised, frozen weights, allocated on the
    current ``torch.device`` context."""
    emb = nn.Embedding(num_embeddings, dim, dtype=dtype, _weight=torch.empty(num_embeddings, dim, dtype=dtype))
    emb.weight.requires_grad_(False)
    return emb


class VocabParallelEmbedding(nn.Module):
    """The token embedding split by vocabulary rows over the tensor-parallel ranks
    (:func:`~fastinfer.distributed.sharding.vocab_shard`): each rank looks up the ids in its rows, zeros the
    others, and one all-reduce sums the ranks' rows (exactly one is non-zero per token). ``weight`` is this
    rank's rows, which a tied lm_head multiplies into this rank's logits."""

    parallel = "vocab"
    weight: nn.Parameter

    def __init__(self, num_embeddings: int, dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.start, rows, _ = vocab_shard(num_embeddings, tp_rank(), tp_size())
        self.num_embeddings = num_embeddings
        self.weight = nn.Parameter(torch.empty(rows, dim, dtype=dtype), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        inside = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(torch.where(inside, local, 0), self.weight)
        return all_reduce(out.masked_fill_(~inside.unsqueeze(-1), 0))

    def load_whole(self, name: str, tensor: Any) -> None:
        if name != "weight" or tensor.shape[0] != self.num_embeddings:
            raise ValueError(f"shape mismatch for the embedding's {name}: checkpoint {tuple(tensor.shape)}, "
                             f"vocab_size {self.num_embeddings}")
        self.weight.data.copy_(materialize(narrow(tensor, 0, self.start, self.weight.shape[0])))


def token_embedding(num_embeddings: int, dim: int, dtype: torch.dtype) -> nn.Embedding | VocabParallelEmbedding:
    """The token embedding: a plain table, or split by vocabulary under tensor parallelism."""
    if tp_size() > 1:
        return VocabParallelEmbedding(num_embeddings, dim, dtype)
    return embedding(num_embeddings, dim, dtype)
