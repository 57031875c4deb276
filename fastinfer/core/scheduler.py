"""Continuous batching: every step, running requests advance first, then waiting ones join while the
token budget, the sequence limit and the KV blocks allow. Out of blocks, the newest running request is
preempted and later recomputed.

The scheduler is the only writer of request state. It hands the worker plain data (:mod:`fastinfer.core.outputs`)
and takes back sampled tokens (:meth:`Scheduler.update`) and drafts for the next step
(:meth:`Scheduler.update_draft_token_ids`). With a draft model it reserves ``num_lookahead_tokens`` slots past a
request's scheduled tokens, where the draft writes its KV while proposing (vLLM's lookahead slots)."""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from fastinfer.core.kv_cache_manager import KVCacheManager, KVGroupStats
from fastinfer.core.outputs import ModelRunnerOutput, NewRequestData, SchedulerOutput
from fastinfer.core.request import Request, RequestStatus

__all__ = ["ModelRunnerOutput", "NewRequestData", "Scheduler", "SchedulerOutput", "SchedulerStats"]


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_usage: float
    num_preemptions: int
    prefix_queries: int
    prefix_hits: int
    num_cached_blocks: int = 0
    num_evictions: int = 0
    kv_groups: list[KVGroupStats] = field(default_factory=list)  # per KV cache group (sliding window)


class Scheduler:
    def __init__(self, kv_cache: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, num_lookahead_tokens: int = 0) -> None:
        self.kv = kv_cache
        self.num_lookahead_tokens = num_lookahead_tokens
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        # n > 1: samples 1.. wait for sample 0's prefill, then share its prompt blocks (copy-on-write)
        self.pending_forks: dict[str, list[Request]] = {}
        self._copies: list[tuple[int, int, int]] = []
        self._on_worker: set[str] = set()  # requests whose state the worker holds
        self._finished_ids: list[str] = []  # finished since the last schedule (the worker drops them)

    # -- queue management ------------------------------------------------------------------------------
    def add_request(self, req: Request, fork_from: Request | None = None) -> None:
        """Queue ``req``; with ``fork_from`` (a sibling sample of the same prompt) it instead waits for that
        sibling's prefill and then shares its prompt blocks (see :meth:`_fork`)."""
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        if not 1 <= req.num_tokens < self.max_model_len:
            raise ValueError(f"request {req.request_id!r}: {req.num_tokens} prompt tokens do not fit "
                             f"max_model_len={self.max_model_len} (at least one token must be generated)")
        self.requests[req.request_id] = req
        if fork_from is not None and fork_from.request_id in self.requests:
            self.pending_forks.setdefault(fork_from.request_id, []).append(req)
        else:
            self.waiting.append(req)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """Finish (stop or abort) requests wherever they are; their blocks go back to the pool."""
        assert status.finished
        done = []
        for rid in request_ids:
            req = self.requests.pop(rid, None)
            if req is None:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            elif req in self.waiting:
                self.waiting.remove(req)
            else:
                for group in self.pending_forks.values():
                    if req in group:
                        group.remove(req)
            req.status = status
            self.kv.free(req)
            if req.request_id in self._on_worker:
                self._on_worker.discard(req.request_id)
                self._finished_ids.append(req.request_id)
            self.waiting.extend(self.pending_forks.pop(rid, []))  # its forks now prefill on their own
            done.append(req)
        return done

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(len(self.running), len(self.waiting), self.kv.usage(), self.num_preemptions,
                              self.kv.prefix_queries, self.kv.prefix_hits, self.kv.num_cached_blocks,
                              self.kv.num_evictions, self.kv.group_stats())

    # -- one step --------------------------------------------------------------------------------------
    def _lookahead(self, req: Request, n: int) -> int:
        """Slots to reserve past ``n`` scheduled tokens: the draft's KV positions of the next proposal, when this
        chunk reaches the request's known tokens (it samples, then drafts; never past max_model_len)."""
        end = req.num_computed_tokens + n
        if not self.num_lookahead_tokens or end < req.num_tokens:
            return 0
        return max(0, min(self.num_lookahead_tokens, self.max_model_len - end))

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(blocks_to_copy=self._copies, finished_req_ids=self._finished_ids)
        self._copies, self._finished_ids = [], []
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens_with_spec - req.num_computed_tokens, budget,
                    self.max_model_len - req.num_computed_tokens)
            if n <= 0:  # cannot happen: a running request always has its last token to compute
                i += 1
                continue
            while not self.kv.allocate_slots(req, n + self._lookahead(req, n)):
                victim = self.running.pop()
                self._preempt(victim, out)
                if victim is req:
                    break
            else:
                self._add(out, req, n)
                budget -= n
                i += 1
        if out.preempted_req_ids:  # no room for newcomers this step
            return out
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            hits = self.kv.get_computed_blocks(req)
            num_hit = hits.num_tokens
            n = min(req.num_tokens - req.num_computed_tokens - num_hit, budget)
            req.num_computed_tokens += num_hit  # for the lookahead; undone below when it does not fit
            ahead = self._lookahead(req, n)
            req.num_computed_tokens -= num_hit
            if not self.kv.allocate_slots(req, n + ahead, hits):
                break
            self.waiting.popleft()
            if num_hit:
                req.num_computed_tokens += num_hit
            if req.status == RequestStatus.WAITING:
                req.num_cached_tokens = num_hit
            self.kv.record_prefix_lookup(req.num_tokens, num_hit)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self._add(out, req, n)
            budget -= n
        return out

    def _add(self, out: SchedulerOutput, req: Request, n: int) -> None:
        num_spec = req.num_computed_tokens + n - req.num_tokens
        if num_spec > 0:
            out.spec_token_ids[req.request_id] = req.spec_token_ids[:num_spec]
        req.spec_token_ids = []  # the proposer makes fresh ones during this step
        if req.request_id not in self._on_worker:
            self._on_worker.add(req.request_id)
            out.new_reqs.append(NewRequestData(req.request_id, list(req.prompt_token_ids),
                                               list(req.output_token_ids), req.sampling_params, req.sample_index,
                                               req.eos_token_ids, req.cache_salt))
        out.req_ids.append(req.request_id)
        out.num_scheduled_tokens.append(n)
        out.num_computed_tokens.append(req.num_computed_tokens)
        out.block_ids.append(self.kv.block_ids(req.request_id))

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.spec_token_ids = []
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        out.preempted_req_ids.append(req.request_id)
        self._on_worker.discard(req.request_id)

    def update(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> list[Request]:
        """Advance computed tokens, append sampled tokens, apply stop rules. Returns the requests that got
        new tokens (finished ones already freed)."""
        touched = []
        for rid, n in zip(sched.req_ids, sched.num_scheduled_tokens):
            req = self.requests.get(rid)
            if req is None or req.status != RequestStatus.RUNNING:
                continue
            # rejected drafts: their KV slots are simply not counted (overwritten later), no copies
            req.num_computed_tokens += n - result.num_rejected.get(req.request_id, 0)
            if req.request_id in result.nonfinite_req_ids:
                req.cacheable = False
            status = None
            new_ids = result.sampled_token_ids.get(req.request_id) or []
            for tok in new_ids:
                req.append_output_token(tok)
                status = self._check_stop(req, tok)
                if status is not None:
                    break
            if req.cacheable:
                self.kv.cache_blocks(req)
            if req.request_id in self.pending_forks and req.num_computed_tokens >= req.num_prompt_tokens:
                for child in self.pending_forks.pop(req.request_id):
                    self._fork(req, child)
            self.kv.remove_skipped_blocks(req)  # after the forks: they read the window of the last prompt token
            if status is not None:
                self.finish_requests([req.request_id], status)
            if new_ids:
                touched.append(req)
        return touched

    def update_draft_token_ids(self, drafts: dict[str, list[int]]) -> None:
        """Take the worker's drafts for the next step (requests that finished meanwhile are skipped); never more
        than fit in max_model_len."""
        for rid, draft in drafts.items():
            req = self.requests.get(rid)
            if req is None or req.status != RequestStatus.RUNNING or not draft:
                continue
            req.spec_token_ids = list(draft[:max(0, self.max_model_len - req.num_tokens)])

    def _fork(self, parent: Request, child: Request) -> None:
        """Start ``child`` (same prompt) from ``parent``'s computed prompt: it shares the blocks that lie wholly
        before the last prompt token and gets a copy of the block holding that token, which it recomputes
        (its own logits, its own sample). Without a free block or a free seat it prefills normally."""
        last = child.num_prompt_tokens - 1
        if len(self.running) >= self.max_num_seqs:
            self.waiting.append(child)
            return
        copies = self.kv.fork(parent, child, last // self.kv.block_size)
        if copies is None:
            self.waiting.append(child)
            return
        self._copies.extend(copies)
        child.num_computed_tokens = last
        child.status = RequestStatus.RUNNING
        self.running.append(child)

    def _check_stop(self, req: Request, tok: int) -> RequestStatus | None:
        sp = req.sampling_params
        if req.num_output_tokens >= sp.min_tokens:
            if not sp.ignore_eos and tok in req.eos_token_ids:
                req.stop_reason = None
                return RequestStatus.FINISHED_STOPPED
            if tok in sp.stop_token_ids:  # type: ignore[operator]
                req.stop_reason = tok
                return RequestStatus.FINISHED_STOPPED
        if sp.max_tokens is not None and req.num_output_tokens >= sp.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
