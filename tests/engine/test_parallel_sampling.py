"""n > 1: the samples share the prompt's KV blocks (copy-on-write on the block holding the last prompt
token) and give the same results as independent prefills."""
from __future__ import annotations

import pytest

from fastinfer import SamplingParams
from fastinfer.core.request import RequestStatus


@pytest.mark.parametrize("prompt_len,block_size", [(21, 4), (16, 4), (5, 16)])
def test_greedy_samples_equal_single_and_share_blocks(tiny_llm, prompt_len, block_size):
    llm = tiny_llm("llama", block_size=block_size, enable_prefix_caching=False)
    ids = list(range(2000, 2000 + prompt_len))
    one = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0].token_ids
    eng = llm.engine
    eng.add_request("fan", {"prompt_token_ids": ids}, SamplingParams(n=4, temperature=0, max_tokens=10,
                                                                     ignore_eos=True))
    sched = eng.scheduler
    eng.step()  # the leader's prefill; the three forks start right after it
    kv = eng.kv
    blocks = [kv.req_blocks[f"fan#{i}"] for i in range(4)]
    shared = (prompt_len - 1) // block_size
    for b in blocks[1:]:
        assert b[:shared] == blocks[0][:shared] and b[shared] not in blocks[0]
    for blk in blocks[0][:shared]:
        assert kv.pool.ref_cnt[blk] == 4
    assert len(sched._copies) == 3
    assert all(sched.requests[f"fan#{i}"].status == RequestStatus.RUNNING for i in range(4))
    final = None
    while eng.has_unfinished_requests():
        for out in eng.step():
            final = out
    assert [o.token_ids for o in final.outputs] == [one] * 4
    assert kv.pool.num_free_blocks == eng.num_kv_blocks


def test_seeded_forks_match_unforked_prefill(tiny_llm):
    """Sample i of a forked n=3 request equals sample i when every sample prefills on its own."""
    sp = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)
    forked = tiny_llm("llama").generate("A seeded fan-out test", sp, use_tqdm=False)[0]
    llm = tiny_llm("llama", max_num_seqs=1)  # no seat for forks: they fall back to their own prefill
    alone = llm.generate("A seeded fan-out test", sp, use_tqdm=False)[0]
    assert [o.token_ids for o in forked.outputs] == [o.token_ids for o in alone.outputs]
    assert len({tuple(o.token_ids) for o in forked.outputs}) == 3


def test_abort_with_pending_forks_frees_everything(tiny_llm):
    llm = tiny_llm("llama", max_num_batched_tokens=4)  # prefill spans steps: forks stay pending
    eng = llm.engine
    eng.add_request("p", "a prompt that takes several chunks to prefill", SamplingParams(n=3, max_tokens=5))
    eng.step()
    assert eng.scheduler.pending_forks
    eng.abort_request("p")
    assert not eng.has_unfinished_requests() and not eng.scheduler.pending_forks
    assert eng.kv.pool.num_free_blocks == eng.num_kv_blocks
