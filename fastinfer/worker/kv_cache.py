"""Sizing and allocating the paged KV cache, in KV cache groups.

Layers of one sliding window form a group (:func:`fastinfer.core.kv_cache_utils.kv_cache_groups`) with its own
block pool, so each group's tensors are sized on their own: every layer's cache is [blocks of its group (+1 for a
window group's null block), block_size, Hkv, D]. The memory budget is split so that a window group gets what it
can ever hold (:func:`~fastinfer.core.kv_cache_utils.window_group_blocks`: about ``max_num_seqs`` windows plus
one step's tokens), never more blocks than the full-attention group, and the full-attention group gets the rest:
the largest ``N`` with ``sum_g min(cap_g, N) * bytes_per_block_g <= budget``. ``num_kv_blocks`` sets ``N``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from fastinfer.config import EngineConfig
from fastinfer.core.kv_cache_utils import cdiv, kv_cache_groups, window_group_blocks, window_group_min_blocks
from fastinfer.models.interface import KVCaches, LayerKVSpec, allocate_kv_caches, kv_bytes_per_token

logger = logging.getLogger("fastinfer")


@dataclass(frozen=True)
class KVCacheLayout:
    """The KV cache groups: window and pool size of each (plain data for the engine's KV manager), the group of
    each layer window (for the attention metadata) and of each target layer (for block copies)."""

    windows: tuple[int | None, ...]
    num_blocks: tuple[int, ...]
    group_of_window: dict[int | None, int]
    layer_groups: tuple[int, ...]

    def tensor_blocks(self, spec: list[LayerKVSpec]) -> list[int]:
        """Blocks of each layer's cache tensors: its group's pool, plus the null block in a window group."""
        return [self.num_blocks[g] + (self.windows[g] is not None)
                for g in (self.group_of_window[s.sliding_window] for s in spec)]

    def allocate(self, spec: list[LayerKVSpec], block_size: int, dtype: torch.dtype, device: torch.device,
                 kv_cache_dtype: str = "auto") -> KVCaches:
        return allocate_kv_caches(spec, self.tensor_blocks(spec), block_size, dtype, device, kv_cache_dtype)


def plan_kv_cache(config: EngineConfig, max_model_len: int, device: torch.device, spec: list[LayerKVSpec],
                  dtype: torch.dtype, draft: tuple[list[LayerKVSpec], torch.dtype] | None = None) -> KVCacheLayout:
    """Groups and block counts: ``num_kv_blocks`` or ``kv_cache_memory_bytes`` when given; on CUDA, a share
    (``gpu_memory_utilization``) of the free device memory; on CPU, ``max_num_seqs x max_model_len`` tokens
    capped at ``DEFAULT_KV_BYTES``. A draft model's cache uses the target's blocks (sized together), and then
    one group holds every layer: the draft's catch-up reads positions the target has passed, so no window
    block is freed. Bytes per block follow ``config.kv_cache_dtype`` (a quantized cache's scales counted), the
    draft's cache too."""
    bs, seqs = config.block_size, config.max_num_seqs
    windows, group_of = kv_cache_groups([s.sliding_window for s in spec], max_model_len, free_windows=draft is None)
    if draft is None and any(w is not None for w in windows):
        logger.info("KV cache groups by sliding window: %s (blocks before a window are freed)", windows)
    elif draft is not None and any(s.sliding_window is not None for s in spec):
        logger.info("sliding-window layers keep every block: a draft model shares the target's block tables")
    block_bytes = [0] * len(windows)
    for s in spec:
        block_bytes[group_of[s.sliding_window]] += kv_bytes_per_token([s], dtype, config.kv_cache_dtype) * bs
    if draft is not None:
        block_bytes[0] += kv_bytes_per_token(draft[0], draft[1], config.kv_cache_dtype) * bs
    wanted = seqs * cdiv(max_model_len, bs)
    chunk = config.max_num_batched_tokens or max(2048, seqs)
    caps = [wanted if w is None else min(wanted, window_group_blocks(w, bs, seqs, chunk)) for w in windows]
    if config.num_kv_blocks is not None:
        counts, why = [min(c, config.num_kv_blocks) if w is not None else config.num_kv_blocks
                       for c, w in zip(caps, windows)], "num_kv_blocks"
    elif config.kv_cache_memory_bytes is not None:
        caps = [c if w is not None else 1 << 62 for c, w in zip(caps, windows)]  # the full group takes it all
        counts, why = _split(config.kv_cache_memory_bytes, caps, block_bytes), "kv_cache_memory_bytes"
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        # what the weights and a forward's activations already hold stays theirs; the KV cache takes the
        # rest of gpu_memory_utilization x total, at most what is free now
        budget = min(free - (1 - config.gpu_memory_utilization) * total,
                     config.gpu_memory_utilization * total - torch.cuda.memory_reserved(device))
        counts = _split(max(0, int(budget)), caps, block_bytes)
        why = f"gpu_memory_utilization={config.gpu_memory_utilization} of {total / 2**30:.1f} GiB"
    else:
        counts = _split(EngineConfig.DEFAULT_KV_BYTES, caps, block_bytes)
        why = (f"max_num_seqs x max_model_len = {seqs} x {max_model_len}"
               + ("" if counts == caps else f", capped at {EngineConfig.DEFAULT_KV_BYTES >> 30} GiB"))
    for w, n in zip(windows, counts):
        if w is None and n * bs < max_model_len:
            raise ValueError(f"a KV cache of {n} blocks x {bs} tokens cannot hold one sequence of "
                             f"max_model_len={max_model_len}; give more KV memory or a smaller max_model_len")
        if w is not None and n < window_group_min_blocks(w, bs, min(chunk, max_model_len), max_model_len):
            raise ValueError(f"the sliding-window ({w}) layers' KV cache of {n} blocks x {bs} tokens cannot hold "
                             f"one request's window plus a step of {min(chunk, max_model_len)} tokens; give more KV "
                             "memory or a smaller max_num_batched_tokens")
    for w, n, b in zip(windows, counts, block_bytes):
        logger.info("KV cache on %s%s: %d blocks x %d tokens = %d tokens (capacity), %.2f GiB, kv_cache_dtype %s "
                    "(%s%s)", device, "" if w is None else f", sliding window {w}", n, bs, n * bs, n * b / 2**30,
                    config.kv_cache_dtype, why, ", with the draft model's" if draft is not None else "")
    layer_groups = tuple(group_of[s.sliding_window] for s in spec)
    return KVCacheLayout(tuple(windows), tuple(counts), group_of, layer_groups)


def _split(budget: int, caps: list[int], block_bytes: list[int]) -> list[int]:
    """Blocks per group: ``min(cap_g, N)`` for the largest ``N`` whose total fits ``budget`` bytes."""
    def cost(n: int) -> int:
        return sum(min(c, n) * b for c, b in zip(caps, block_bytes))

    lo, hi = 0, max(caps)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return [min(c, lo) for c in caps]
