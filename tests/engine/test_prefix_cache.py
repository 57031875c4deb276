"""Prefix caching: identical greedy outputs with the cache on and off (shared prefixes, warm cache,
evictions, preemption, chunk boundaries); salts never share; NaN-producing requests never publish."""
from __future__ import annotations

import pytest
import torch

from fastinfer import SamplingParams

SYSTEM = ("You are a careful assistant. Answer questions about the printing press, its inventors, the "
          "spread of movable type across Europe, and the economics of early book production. ") * 2
QUESTIONS = ["Who built the first press?", "When did it reach Venice?", "What did a book cost?",
             "Name one printed Bible.", "Why was paper important?", "How fast could a press print?"]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def _run(llm, prompts):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def reference(tiny_llm):
    off = tiny_llm("llama", enable_prefix_caching=False)
    return _run(off, [SYSTEM + q for q in QUESTIONS])


def test_shared_prefix_batch_and_warm_cache_equal_cache_off(tiny_llm, reference):
    on = tiny_llm("llama", enable_prefix_caching=True)
    prompts = [SYSTEM + q for q in QUESTIONS]
    assert _run(on, prompts[:2]) == reference[:2]
    outs = on.generate(prompts, GREEDY, use_tqdm=False)  # warm: the system prompt comes from the cache
    assert [o.outputs[0].token_ids for o in outs] == reference
    assert all(o.num_cached_tokens > 0 for o in outs)
    kv = on.engine.kv
    assert kv.prefix_hits > 0 and kv.prefix_hits <= kv.prefix_queries


@pytest.mark.parametrize("kw", [
    {"num_kv_blocks": 40, "block_size": 4, "max_model_len": 128},  # evictions + preemption
    {"max_num_batched_tokens": 7, "block_size": 8},  # hits and chunks end mid-block
    {"block_size": 32},
])
def test_cache_on_equals_off_under_pressure(tiny_llm, reference, kw):
    on = tiny_llm("llama", enable_prefix_caching=True, **kw)
    prompts = [SYSTEM + q for q in QUESTIONS]
    for _ in range(2):
        assert _run(on, prompts) == reference
    if "num_kv_blocks" in kw:
        pool = on.engine.kv.pool
        assert pool.num_evictions > 0 and on.engine.scheduler.num_preemptions > 0
        assert pool.num_free_blocks == pool.num_blocks  # nothing leaked


def test_hit_never_covers_last_prompt_token(tiny_llm):
    llm = tiny_llm("llama", enable_prefix_caching=True, block_size=4)
    ids = list(range(1000, 1016))  # exactly 4 blocks
    llm.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False)
    again = llm.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens == 12


def test_different_salts_never_share(tiny_llm):
    llm = tiny_llm("llama", enable_prefix_caching=True)
    p = SYSTEM + QUESTIONS[0]
    first = llm.generate({"prompt": p, "cache_salt": "tenant-a"}, GREEDY, use_tqdm=False)[0]
    other = llm.generate({"prompt": p, "cache_salt": "tenant-b"}, GREEDY, use_tqdm=False)[0]
    same = llm.generate({"prompt": p, "cache_salt": "tenant-a"}, GREEDY, use_tqdm=False)[0]
    unsalted = llm.generate(p, GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0 and other.num_cached_tokens == 0 and unsalted.num_cached_tokens == 0
    assert same.num_cached_tokens > 0
    assert first.outputs[0].token_ids == other.outputs[0].token_ids == same.outputs[0].token_ids


def test_nonfinite_forward_never_publishes(tiny_llm):
    llm = tiny_llm("llama", enable_prefix_caching=True)
    model = llm.engine.worker.model
    poison = {"on": True}

    def hook(_module, _inputs, output):
        if poison["on"]:
            return (torch.full_like(output[0], float("nan")), output[1])
        return output

    handle = model.norm.register_forward_hook(hook)
    try:
        p = SYSTEM + QUESTIONS[1]
        llm.generate(p, GREEDY, use_tqdm=False)
        assert llm.engine.kv.pool.num_cached_blocks == 0
        poison["on"] = False
        clean = llm.generate(p, GREEDY, use_tqdm=False)[0]
        assert clean.num_cached_tokens == 0  # nothing was published by the poisoned run
        again = llm.generate(p, GREEDY, use_tqdm=False)[0]
        assert again.num_cached_tokens > 0
    finally:
        handle.remove()
