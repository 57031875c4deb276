"""Embedding tables (token ids, learned absolute positions): uninitialised, filled by the checkpoint."""
from __future__ import annotations

import torch
from torch import nn


def embedding(num_embeddings: int, dim: int, dtype: torch.dtype) -> nn.Embedding:
    """An ``nn.Embedding`` [num_embeddings, dim] of ``dtype`` with uninitialised, frozen weights, allocated on the
    current ``torch.device`` context."""
    emb = nn.Embedding(num_embeddings, dim, dtype=dtype, _weight=torch.empty(num_embeddings, dim, dtype=dtype))
    emb.weight.requires_grad_(False)
    return emb
