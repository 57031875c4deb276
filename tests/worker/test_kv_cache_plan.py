"""KV cache sizing in groups: a sliding-window group gets what it can ever hold (never more than the full group),
the full-attention group the rest of the budget; clear errors when a group cannot serve one request."""
from __future__ import annotations

import pytest
import torch

from fastinfer.config import EngineConfig
from fastinfer.core.kv_cache_utils import window_group_blocks
from fastinfer.models.interface import LayerKVSpec, kv_bytes_per_token
from fastinfer.worker.kv_cache import plan_kv_cache

CPU = torch.device("cpu")
# Gemma-3-like: five 64-token window layers per full-attention layer (2 KV heads x 16 dims)
SPEC = [LayerKVSpec(2, 16, None if i % 6 == 5 else 64) for i in range(12)]
BS, SEQS, CHUNK, MAX_LEN = 16, 8, 256, 1024


def _config(**kw) -> EngineConfig:
    return EngineConfig(model="unused", block_size=BS, max_num_seqs=SEQS, max_num_batched_tokens=CHUNK, **kw)


def _bytes_per_block(window: int | None) -> int:
    return kv_bytes_per_token([s for s in SPEC if s.sliding_window == window], torch.float32) * BS


def test_memory_budget_split_between_groups():
    budget = 4 << 20
    plan = plan_kv_cache(_config(kv_cache_memory_bytes=budget), MAX_LEN, CPU, SPEC, torch.float32)
    assert plan.windows == (None, 64)
    assert plan.group_of_window == {None: 0, 64: 1}
    assert plan.layer_groups == tuple(0 if s.sliding_window is None else 1 for s in SPEC)
    full, win = plan.num_blocks
    cap = window_group_blocks(64, BS, SEQS, CHUNK)
    assert win == min(cap, full)
    used = full * _bytes_per_block(None) + win * _bytes_per_block(64)
    assert used <= budget < used + _bytes_per_block(None)  # the full group took the rest, to the last block
    without_groups = budget // (kv_bytes_per_token(SPEC, torch.float32) * BS)
    assert full > 2 * without_groups  # freed window layers let the full group hold far more tokens
    assert plan.tensor_blocks(SPEC) == [full if s.sliding_window is None else win + 1 for s in SPEC]  # + null block


def test_num_kv_blocks_sets_the_full_group_and_caps_the_window_group():
    plan = plan_kv_cache(_config(num_kv_blocks=70), MAX_LEN, CPU, SPEC, torch.float32)
    assert plan.num_blocks == (70, min(70, window_group_blocks(64, BS, SEQS, CHUNK)))
    plan = plan_kv_cache(_config(num_kv_blocks=1000), MAX_LEN, CPU, SPEC, torch.float32)
    assert plan.num_blocks == (1000, window_group_blocks(64, BS, SEQS, CHUNK))


def test_one_group_with_a_draft_model_and_errors_for_small_caches():
    draft = ([LayerKVSpec(1, 16)], torch.float32)
    plan = plan_kv_cache(_config(num_kv_blocks=70), MAX_LEN, CPU, SPEC, torch.float32, draft)
    assert plan.windows == (None,) and plan.num_blocks == (70,) and set(plan.group_of_window.values()) == {0}
    with pytest.raises(ValueError, match="cannot hold one sequence of max_model_len=1024"):
        plan_kv_cache(_config(num_kv_blocks=63), MAX_LEN, CPU, SPEC, torch.float32)
    windowed = [LayerKVSpec(2, 16, 64)] * 2  # Mistral-like: every layer windowed, no full group
    with pytest.raises(ValueError, match=r"sliding-window \(64\) layers' KV cache of 10 blocks"):
        plan_kv_cache(_config(num_kv_blocks=10), MAX_LEN, CPU, windowed, torch.float32)
    assert plan_kv_cache(_config(num_kv_blocks=22), MAX_LEN, CPU, windowed, torch.float32).num_blocks == (22,)
