"""KV cache groups (plain Python): a sliding-window group frees the blocks wholly before a request's window (exact
edges), holds a bounded number of blocks however long the context, serves prefix hits only where the window's
blocks are still cached, and forks share blocks per group."""
from __future__ import annotations

import random

import pytest

from fastinfer.core.kv_cache_manager import KVCacheManager, cdiv
from fastinfer.core.kv_cache_utils import kv_cache_groups, window_group_blocks
from fastinfer.core.request import Request
from fastinfer.core.scheduler import ModelRunnerOutput, Scheduler
from fastinfer.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
BS, W = 4, 8


def make_req(rid: str, n: int, params: SamplingParams = GREEDY) -> Request:
    return Request(rid, [100 + (i * 7) % 23 for i in range(n)], params, eos_token_ids=(2,))


def real(blocks: list[int], kv: KVCacheManager, g: int) -> list[int]:
    return [b for b in blocks if b != kv.null_block(g)]


def test_groups_by_window():
    assert kv_cache_groups([8, None, 8, None], 64) == ([None, 8], {None: 0, 8: 1})
    assert kv_cache_groups([24, 24], 512) == ([24], {24: 0})
    assert kv_cache_groups([512, None], 256) == ([None], {512: 0, None: 0})  # a window >= max_model_len drops nothing
    assert kv_cache_groups([8, None], 64, free_windows=False) == ([None], {8: 0, None: 0})


@pytest.mark.parametrize("start", range(0, 20))
def test_freeing_rule_at_exact_edges(start):
    """Before computing from position ``start``, block j (positions 4j..4j+3) is freed iff its last position is
    below ``start - W + 1``, the first key the query at ``start`` reads."""
    kv = KVCacheManager([16, 16], BS, sliding_windows=[None, W])
    r = make_req("r", 30)
    assert kv.allocate_slots(r, start + 1)
    r.num_computed_tokens = start
    assert kv.allocate_slots(r, 3)  # a chunk of 3 from ``start``
    full, win = kv.block_ids("r")
    assert len(full) == len(win) == cdiv(start + 3, BS)
    for j, b in enumerate(win):
        freed = j * BS + BS - 1 < start - W + 1
        assert (b == kv.null_block(1)) == freed, (j, b)
    assert kv.null_block(0) not in full
    assert kv.groups[1].pool.num_in_use == len(real(win, kv, 1))


def _run(sched: Scheduler, drafts: dict[str, list[int]] | None = None, reject: int = 0) -> list:
    """Step until done: sample token 7 for every request that caught up; optionally propose ``drafts`` and reject
    the last ``reject`` of them. Returns the scheduler outputs."""
    outs = []
    while sched.has_unfinished_requests():
        out = sched.schedule()
        outs.append(out)
        res = ModelRunnerOutput()
        for rid, start, n in zip(out.req_ids, out.num_computed_tokens, out.num_scheduled_tokens):
            req = sched.requests[rid]
            k = len(out.spec_token_ids.get(rid, []))
            if start + n - k == req.num_tokens:
                rej = min(reject, k)
                res.sampled_token_ids[rid] = out.spec_token_ids.get(rid, [])[:k - rej] + [7]
                res.num_rejected[rid] = rej
        sched.update(out, res)
        if drafts:
            sched.update_draft_token_ids({rid: drafts[rid] for rid in res.sampled_token_ids if rid in drafts})
    return outs


@pytest.mark.parametrize("spec", [False, True], ids=["plain", "drafts"])
def test_window_blocks_bounded_over_a_long_context(spec):
    """Chunked prefill of 3 requests x 50 tokens (budget 8) and 40 decode steps: the window group holds at most
    cdiv(W - 1 + n, BS) + 1 blocks per request (n tokens scheduled), the full group every block; with drafts
    (2 per step, 1 rejected) the same."""
    seqs, budget = 3, 8
    counts = [64, window_group_blocks(W, BS, seqs, budget)]
    kv = KVCacheManager(counts, BS, sliding_windows=[None, W])
    sched = Scheduler(kv, seqs, budget, 128)
    for i in range(seqs):
        sched.add_request(make_req(f"r{i}", 50))
    outs = _run(sched, {f"r{i}": [5, 6] for i in range(seqs)} if spec else None, reject=1 if spec else 0)
    assert sum(len(o.spec_token_ids) for o in outs) > (10 if spec else -1)
    for out in outs:
        for start, n, (full, win) in zip(out.num_computed_tokens, out.num_scheduled_tokens, out.block_ids):
            assert len(full) == len(win) >= cdiv(start + n, BS)
            assert kv.null_block(0) not in full
            held = real(win, kv, 1)
            assert len(held) <= cdiv(W - 1 + n, BS) + 1
            first = max(0, start - W + 1) // BS  # the first key of the chunk's first query lies in block ``first``
            assert win[:first] == [kv.null_block(1)] * first and kv.null_block(1) not in win[first:]
    stats = kv.group_stats()
    assert stats[0].peak_in_use >= seqs * cdiv(50, BS)  # the full group held whole contexts
    assert stats[1].peak_in_use <= counts[1] < stats[0].peak_in_use
    assert all(s.num_in_use == 0 for s in stats)


def _cached_manager(cached_window_blocks: set[int], num_tokens: int) -> tuple[KVCacheManager, Request]:
    """A manager whose full group caches every block of the request's prompt and whose window group caches only
    ``cached_window_blocks`` (by block index)."""
    kv = KVCacheManager([32, 32], BS, enable_caching=True, sliding_windows=[None, W])
    r = make_req("probe", num_tokens)
    r.update_block_hashes(BS)
    full, win = kv.groups[0].pool, kv.groups[1].pool
    ids_f, ids_w = full.allocate(len(r.block_hashes)), win.allocate(len(r.block_hashes))
    for j, h in enumerate(r.block_hashes):
        full.cache(ids_f[j], h)
        if j in cached_window_blocks:
            win.cache(ids_w[j], h)
    full.free(ids_f)
    win.free(ids_w)
    return kv, r


@pytest.mark.parametrize("seed", range(12))
def test_prefix_hit_needs_the_window_before_it(seed):
    """A hit of L tokens needs every position in [L - W + 1, L) in a cached window block (and the full group's
    blocks below L); the longest such L is served, never covering the last prompt token."""
    rng = random.Random(seed)
    n = rng.randrange(9, 40)
    cached = {j for j in range(n // BS) if rng.random() < 0.6}
    kv, r = _cached_manager(cached, n)
    hit = kv.get_computed_blocks(r)
    limit = (n - 1) // BS

    def ok(m: int) -> bool:
        return all(p // BS in cached for p in range(max(0, m * BS - W + 1), m * BS))

    expect = max(m for m in range(limit + 1) if ok(m))
    assert hit.num_tokens == expect * BS
    full, win = hit.blocks
    assert len(full) == len(win) == expect
    first = max(0, expect * BS - W + 1) // BS
    assert win[:first] == [kv.null_block(1)] * first and kv.null_block(1) not in win[first:]
    assert kv.allocate_slots(r, n - hit.num_tokens, hit)
    assert kv.groups[1].pool.num_in_use == len(real(kv.block_ids("probe")[1], kv, 1))


def test_freed_window_blocks_stay_cached_and_serve_a_later_hit():
    """A request's window blocks are freed as it passes them but keep their hash: a second request with the same
    prompt hits its whole length (but the last token) in both groups."""
    kv = KVCacheManager([32, 32], BS, enable_caching=True, sliding_windows=[None, W])
    sched = Scheduler(kv, 4, 8, 128)
    sched.add_request(make_req("a", 30, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)))
    _run(sched)
    b = make_req("b", 30)
    hit = kv.get_computed_blocks(b)
    assert hit.num_tokens == (30 - 1) // BS * BS
    assert kv.groups[1].pool.num_cached_blocks == 30 // BS == hit.num_tokens // BS  # every computed full block


def test_fork_shares_blocks_per_group():
    """n = 2: the second sample forks from the first's prefill in both groups (shared blocks ref-counted, one copy
    per group); its window table holds every block its next query reads; all blocks come back at the end."""
    kv = KVCacheManager([32, 32], BS, sliding_windows=[None, W])
    sched = Scheduler(kv, 4, 64, 128)
    p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    a, b = make_req("s0", 22, p), make_req("s1", 22, p)
    sched.add_request(a)
    sched.add_request(b, fork_from=a)
    out = sched.schedule()
    sched.update(out, ModelRunnerOutput({"s0": [7]}))
    assert b.num_computed_tokens == 21  # forked: recomputes only its last prompt token
    out = sched.schedule()
    assert sorted(g for g, _, _ in out.blocks_to_copy) == [0, 1]
    i = out.req_ids.index("s1")
    full, win = out.block_ids[i]
    pa_full, pa_win = kv.block_ids("s0")
    assert full[:5] == pa_full[:5] and all(kv.groups[0].pool.ref_cnt[x] == 2 for x in full[:5])
    first = (21 - W + 1) // BS
    assert win[:first] == [kv.null_block(1)] * first and kv.null_block(1) not in win[first:]
    assert win[first:5] == pa_win[first:5]
    _run(sched)
    assert all(s.num_in_use == 0 for s in kv.group_stats())


def test_preemption_when_the_window_group_runs_out():
    """A window pool with room for one request's window forces preemption; every request still finishes and every
    block comes back."""
    kv = KVCacheManager([64, cdiv(W - 1 + 8, BS) + 2], BS, sliding_windows=[None, W])
    sched = Scheduler(kv, 3, 8, 128)
    for i in range(3):
        sched.add_request(make_req(f"r{i}", 20))
    _run(sched)
    assert sched.num_preemptions > 0
    assert all(s.num_in_use == 0 for s in kv.group_stats())
