"""Shared input builder for the paged-attention kernel tests (cpp and Triton backends)."""
from __future__ import annotations

import random

import torch

from fastinfer.ops import AttentionMetadata, reference


def paged_case(query_lens: list[int], seq_lens: list[int], num_heads: int, num_kv: int, head_dim: int,
               block_size: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu",
               kv_cache_dtype: str | None = None):
    """Random q and a paged cache: shuffled (non-contiguous) block ids, spare blocks, every slot that no
    sequence has written yet (positions >= seq_len) filled with NaN. Returns (q, k_cache, v_cache, meta).
    ``kv_cache_dtype`` "int8" / "fp8_e4m3": a quantized cache [num_blocks, block_size, Hkv, D + 2] (int8 /
    uint8) whose unwritten slots are all 0x7F bytes (a NaN fp16 scale, and the NaN fp8 code)."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    need = [-(-s // block_size) for s in seq_lens]
    ids = list(range(sum(need) + 3))
    rng.shuffle(ids)
    block_ids = [ids[sum(need[:i]):sum(need[:i + 1])] for i in range(len(need))]
    shape = (len(ids), block_size, num_kv, head_dim)  # [num_blocks, block_size, Hkv, D]
    if kv_cache_dtype is None:
        k_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
        v_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    else:
        qdtype = {"int8": torch.int8, "fp8_e4m3": torch.uint8}[kv_cache_dtype]
        k_cache = torch.full((*shape[:-1], head_dim + 2), 0x7F, dtype=qdtype, device=device)
        v_cache = torch.full((*shape[:-1], head_dim + 2), 0x7F, dtype=qdtype, device=device)
    full = AttentionMetadata.build(seq_lens, seq_lens, block_ids, block_size, device)  # every written slot
    n = sum(seq_lens)
    keys = torch.randn(n, num_kv, head_dim, generator=gen).to(device, dtype)  # [sum L, Hkv, D]
    values = torch.randn(n, num_kv, head_dim, generator=gen).to(device, dtype)
    reference.store_kv(keys, values, k_cache, v_cache, full.slot_mapping)
    q = torch.randn(sum(query_lens), num_heads, head_dim, generator=gen).to(device, dtype)  # [T, H, D]
    meta = AttentionMetadata.build(query_lens, seq_lens, block_ids, block_size, device)
    return q, k_cache, v_cache, meta
