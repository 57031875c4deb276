"""Scheduler + KV-cache manager: exact block ids, token budgets, chunking, preemption order."""
from fastinfer.core.kv_cache_manager import KVCacheManager
from fastinfer.core.request import Request, RequestStatus
from fastinfer.core.scheduler import ModelRunnerOutput, Scheduler
from fastinfer.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)


def make(num_blocks=16, block_size=4, budget=8, max_seqs=8, caching=False, max_len=64):
    kv = KVCacheManager(num_blocks, block_size, caching)
    return Scheduler(kv, max_seqs, budget, max_len), kv


_REQS: dict[str, Request] = {}


def req(rid, n, params=GREEDY):
    _REQS[rid] = Request(rid, list(range(100, 100 + n)), params, eos_token_ids=(2,))
    return _REQS[rid]


def sample_all(sched_out, token=7):
    """A runner output sampling ``token`` for every request whose computed tokens caught up (the worker knows
    that from its own state; the test reads the core requests, which the scheduler has not changed yet)."""
    out = ModelRunnerOutput()
    for rid, start, n in zip(sched_out.req_ids, sched_out.num_computed_tokens, sched_out.num_scheduled_tokens):
        if start + n == _REQS[rid].num_tokens:
            out.sampled_token_ids[rid] = [token]
    return out


def test_chunked_prefill_budget_and_block_ids():
    s, kv = make(budget=8)
    a, b = req("A", 10), req("B", 5)
    s.add_request(a)
    s.add_request(b)
    out = s.schedule()
    assert out.req_ids == ["A"] and out.num_scheduled_tokens == [8]
    assert out.block_ids == [([0, 1],)]
    s.update(out, sample_all(out))
    assert a.num_computed_tokens == 8 and a.num_output_tokens == 0  # mid-prefill: nothing sampled
    out = s.schedule()
    assert out.req_ids == ["A", "B"] and out.num_scheduled_tokens == [2, 5]
    assert out.block_ids == [([0, 1, 2],), ([3, 4],)]
    s.update(out, sample_all(out))
    assert a.output_token_ids == [7] and b.output_token_ids == [7]
    out = s.schedule()  # both decode: one token each
    assert out.num_scheduled_tokens == [1, 1]
    assert out.total_num_scheduled_tokens == 2


def test_max_num_seqs_limits_admission():
    s, _ = make(budget=100, max_seqs=2)
    for i in range(3):
        s.add_request(req(f"R{i}", 3))
    out = s.schedule()
    assert out.req_ids == ["R0", "R1"]
    assert len(s.waiting) == 1


def test_preempts_newest_running_and_recomputes():
    s, kv = make(num_blocks=4, block_size=4, budget=64)
    a, b = req("A", 7), req("B", 7)
    s.add_request(a)
    s.add_request(b)
    out = s.schedule()
    assert out.block_ids == [([0, 1],), ([2, 3],)]
    s.update(out, sample_all(out))  # 8 tokens each, 7 computed
    out = s.schedule()
    assert out.num_scheduled_tokens == [1, 1] and not out.preempted_req_ids  # slot 8 fits block 2
    s.update(out, sample_all(out))  # 9 tokens, 8 computed: A needs a third block, none free
    out = s.schedule()
    assert out.preempted_req_ids == ["B"]
    assert out.req_ids == ["A"]
    assert out.block_ids == [([0, 1, 2],)]  # B freed tail-first (3, then 2), each to the queue front: 2 comes first
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert s.waiting[0] is b
    assert b.output_token_ids == [7, 7]  # kept: recomputed as part of the prefill later
    s.update(out, sample_all(out))
    s.finish_requests(["A"], RequestStatus.FINISHED_ABORTED)
    assert kv.pool.num_free_blocks == 4
    out = s.schedule()
    assert out.req_ids == ["B"] and out.num_scheduled_tokens == [9]
    assert out.block_ids == [([0, 1, 2],)]  # A freed 2, 1, 0 to the front in turn


def test_stop_conditions():
    s, kv = make(budget=64, max_len=12)
    eos = req("eos", 3, SamplingParams(temperature=0, max_tokens=10))
    stop = req("stop", 3, SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[9]))
    mx = req("max", 3, SamplingParams(temperature=0, max_tokens=1))
    ctx = req("ctx", 11, SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))
    minimum = req("min", 3, SamplingParams(temperature=0, max_tokens=10, min_tokens=2))
    for r in (eos, stop, mx, ctx, minimum):
        s.add_request(r)
    out = s.schedule()
    res = ModelRunnerOutput({"eos": [2], "stop": [9], "max": [5], "ctx": [5], "min": [2]})
    s.update(out, res)
    assert eos.status == RequestStatus.FINISHED_STOPPED and eos.stop_reason is None
    assert stop.status == RequestStatus.FINISHED_STOPPED and stop.stop_reason == 9
    assert mx.status == RequestStatus.FINISHED_LENGTH
    assert ctx.status == RequestStatus.FINISHED_LENGTH  # hit max_model_len
    assert minimum.status == RequestStatus.RUNNING  # EOS before min_tokens does not stop
    assert set(s.requests) == {"min"}
    assert kv.pool.num_free_blocks == 16 - 1


def test_prefix_hits_share_blocks_and_never_cover_last_token():
    s, kv = make(num_blocks=16, block_size=4, budget=64, caching=True)
    a = req("A", 10)
    s.add_request(a)
    out = s.schedule()
    s.update(out, sample_all(out))
    assert kv.pool.num_cached_blocks == 2  # two full blocks of the prompt published
    b = req("B", 10)  # same tokens
    s.add_request(b)
    out = s.schedule()
    i = out.req_ids.index("B")
    assert out.block_ids[i][0][:2] == [0, 1] and out.num_scheduled_tokens[i] == 2
    assert b.num_cached_tokens == 8
    c = req("C", 8)  # exactly two blocks: the hit may cover only the first (last token is recomputed)
    s.add_request(c)
    out = s.schedule()
    i = out.req_ids.index("C")
    assert out.block_ids[i][0][0] == 0 and out.num_scheduled_tokens[i] == 4
    assert kv.pool.ref_cnt[0] == 3


def test_add_request_rejects_prompts_that_do_not_fit():
    import pytest

    s, _ = make(max_len=8)
    with pytest.raises(ValueError, match="max_model_len=8"):
        s.add_request(req("long", 8))
    with pytest.raises(ValueError):
        s.add_request(Request("empty", [], GREEDY))
