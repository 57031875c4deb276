"""Tensor parallelism on 2 CPU ranks (gloo) against one process, on tiny random Llama models: fp32 greedy tokens
identical with batching, preemption and prefix caching (KV heads split); int4 with more ranks than KV heads
(replicated KV) equal to int4 on one process. One TP engine per test (a spawned rank costs seconds)."""
from __future__ import annotations

import gc

import psutil
import pytest
import torch

from fastinfer import SamplingParams

PROMPTS = ["the quick brown fox jumps over the lazy dog", "hello", "a b c d e f g h i j k l m n o p",
           "tensor parallelism splits the heads", "one two three", "x y z"]
TIGHT = dict(num_kv_blocks=14, block_size=4, max_model_len=48, max_num_seqs=4)


def _greedy(llm, prompts, n=20):
    sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)], llm


def test_tp2_equals_tp1_batching_preemption_prefix_cache(tiny_llm):
    ref, _ = _greedy(tiny_llm("llama", **TIGHT), PROMPTS)
    llm = tiny_llm("llama", tensor_parallel_size=2, distributed_timeout_s=30, **TIGHT)
    pids = llm.worker_pids()
    assert len(pids) == 1 and psutil.pid_exists(pids[0])
    got, _ = _greedy(llm, PROMPTS)
    assert got == ref
    assert llm.engine.scheduler.num_preemptions > 0  # the tight KV cache forced recomputation
    for _ in range(2):  # the second run reads the first one's blocks from the prefix cache
        again = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                             use_tqdm=False)[0]
        assert list(again.outputs[0].token_ids) == ref[0]
    assert again.num_cached_tokens >= 8
    worker = psutil.Process(pids[0])
    del llm
    gc.collect()  # garbage collection stops the ranks
    worker.wait(timeout=10)
    assert not psutil.pid_exists(pids[0]) or worker.status() == psutil.STATUS_ZOMBIE


def test_tp2_int4_replicated_kv_equals_int4_tp1(tiny_llm):
    """llama3rope: 4 query heads and 1 KV head (replicated on both ranks), tied embeddings, llama3 RoPE; int4
    weights in groups of 32 (row-parallel shards split on group boundaries) and the int8 lm_head."""
    kw = dict(quantization="int4-g32", max_num_seqs=4)
    ref, one = _greedy(tiny_llm("llama3rope", **kw), PROMPTS)
    got, llm = _greedy(tiny_llm("llama3rope", tensor_parallel_size=2, **kw), PROMPTS)
    assert got == ref
    want = one.prompt_logits(PROMPTS[0])  # teacher-forced logits through every rank's forward
    lp = llm.prompt_logits(PROMPTS[0])
    assert lp.shape == want.shape and torch.allclose(lp, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="one engine per process"):
        tiny_llm("llama")  # the rank and process groups are per process
    llm.shutdown()
