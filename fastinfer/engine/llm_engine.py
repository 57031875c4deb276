"""The synchronous engine: add requests, call ``step()`` until done. Each step schedules, has the worker run
the model once, updates request state, detokenizes and returns the outputs that changed.

The engine imports no torch: the device, the model, the KV tensors, sampling and speculation belong to the
worker (:mod:`fastinfer.worker`), which it reaches only with plain data (``SchedulerOutput`` in,
``ModelRunnerOutput`` out)."""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fastinfer.config import EngineConfig, SpeculativeConfig
from fastinfer.core.kv_cache_manager import KVCacheManager
from fastinfer.core.outputs import ModelRunnerOutput, SchedulerOutput
from fastinfer.core.request import Request, RequestStatus
from fastinfer.core.scheduler import Scheduler
from fastinfer.engine.detokenizer import IncrementalDetokenizer
from fastinfer.outputs import CompletionOutput, Logprob, RequestOutput
from fastinfer.sampling_params import SamplingParams

logger = logging.getLogger("fastinfer")

PromptType = str | list[int] | dict[str, Any]


@dataclass
class _Sample:
    """Engine-side state of one sample (one core ``Request``)."""

    req: Request
    detok: IncrementalDetokenizer
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[_Sample] = field(default_factory=list)
    arrival: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return all(s.req.is_finished for s in self.samples)


class LLMEngine:
    """Owns the model, the KV cache, the scheduler and the tokenizer of one served model."""

    def __init__(self, config: EngineConfig) -> None:
        from fastinfer.worker.worker import Worker  # the in-process executor: one worker on one device

        self.config = config
        self.worker = Worker(config)
        info = self.worker.info
        self.tokenizer = self.worker.tokenizer
        self.model_config = self.worker.model_config  # plain data (a frozen dataclass)
        self.load_seconds = info.load_seconds
        self.dtype = info.dtype
        self.device = info.device
        self.max_model_len = info.max_model_len
        self.spec = (SpeculativeConfig.from_dict(dict(config.speculative_config))
                     if config.speculative_config is not None else None)
        self.num_kv_blocks = info.num_kv_blocks
        self.kv = KVCacheManager(info.kv_group_blocks or info.num_kv_blocks, config.block_size,
                                 config.enable_prefix_caching, info.kv_group_windows)
        budget = config.max_num_batched_tokens or max(2048, config.max_num_seqs)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, budget, self.max_model_len,
                                   info.num_lookahead_tokens)
        self.eos_token_ids = info.eos_token_ids
        # counters; acceptance rate = accepted / draft tokens, mean acceptance length = 1 + accepted / steps
        self.spec_stats: dict[str, float] = {"steps": 0, "draft_tokens": 0, "accepted_tokens": 0,
                                             "draft_time_s": 0.0, "verify_time_s": 0.0}
        self._parents: dict[str, _Parent] = {}
        self._owner: dict[str, _Parent] = {}  # core request id -> parent
        self.num_steps = 0

    # -- requests --------------------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """Text and token ids of a prompt given as text, token ids or ``{"prompt"|"prompt_token_ids": ...}``."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), self._check_ids(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            return None, self._check_ids(prompt)
        raise ValueError(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        vocab = self.model_config.vocab_size
        if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in ids):
            raise ValueError("prompt_token_ids must be a list of integers")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt_token_ids out of range [0, {vocab}): {bad[:5]}")
        return list(ids)

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                    cache_salt: str | None = None) -> None:
        """Queue a prompt. Raises ValueError (and queues nothing) for an empty or too long prompt, a
        duplicate id or bad token ids."""
        params = params or SamplingParams()
        if isinstance(prompt, dict) and prompt.get("cache_salt") is not None:
            cache_salt = prompt["cache_salt"]
            if not isinstance(cache_salt, str) or not cache_salt:
                raise ValueError("cache_salt must be a non-empty string")
        if request_id in self._parents:
            raise ValueError(f"duplicate request id {request_id!r}")
        text, ids = self.tokenize_prompt(prompt)
        if not ids:
            raise ValueError("prompt is empty (no tokens)")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens but max_model_len is {self.max_model_len} "
                             "(prompt plus at least one generated token)")
        parent = _Parent(request_id, text, ids, params)
        count = params.num_samples
        # best_of ranks by cumulative logprob: track it even when the user did not ask for logprobs
        run_params = dataclasses.replace(params, logprobs=0) if count > params.n and params.logprobs is None \
            else params
        for i in range(count):
            rid = request_id if count == 1 else f"{request_id}#{i}"
            req = Request(rid, ids, run_params, self.eos_token_ids, sample_index=i, cache_salt=cache_salt)
            parent.samples.append(_Sample(req, IncrementalDetokenizer(self.tokenizer, ids, params),
                                          [] if run_params.logprobs is not None else None,
                                          0.0 if run_params.logprobs is not None else None))
        leader = parent.samples[0].req
        for s in parent.samples:
            self.scheduler.add_request(s.req, fork_from=None if s.req is leader else leader)
            self._owner[s.req.request_id] = parent
        self._parents[request_id] = parent

    def abort_request(self, request_ids: str | Sequence[str]) -> None:
        """Stop requests (e.g. a client went away); their KV blocks are freed at once."""
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            parent = self._parents.pop(rid, None)
            if parent is None:
                continue
            ids = [s.req.request_id for s in parent.samples]
            self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)
            for i in ids:
                self._owner.pop(i, None)

    def prompt_logits(self, prompt: PromptType) -> Any:
        """Teacher-forced next-token logits at every position of one prompt: a float32 CPU tensor [T, vocab]
        from the served model (its dtype, quantization, attention backend and paged attention, with a KV cache
        of the call's own). Synchronous; call it between steps."""
        _, ids = self.tokenize_prompt(prompt)
        if not ids or len(ids) > self.max_model_len:
            raise ValueError(f"prompt_logits needs 1 to max_model_len={self.max_model_len} tokens, got {len(ids)}")
        return self.worker.prompt_logits(ids)

    def expert_load(self) -> dict[int, list[int]]:
        """Mixture-of-Experts routing balance: tokens routed to each expert so far, per MoE decoder layer
        ({layer index: [count per expert]}; {} for a dense model). Each token counts once per expert it chose."""
        return self.worker.expert_load()

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    def get_num_unfinished_requests(self) -> int:
        return len(self._parents)

    # -- the loop --------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; returns an output for every request that changed."""
        sched = self.scheduler.schedule()
        if sched.is_empty():
            if sched.finished_req_ids or sched.preempted_req_ids:
                self.worker.execute(sched)  # let the worker drop what it held for them
            return []
        self.num_steps += 1
        t0 = time.perf_counter()
        try:
            result = self.worker.execute(sched)
        except Exception as e:  # keep serving: fail this batch's requests, loudly
            logger.exception("model step failed; failing the %d requests of this batch", len(sched.req_ids))
            return self._fail(sched, f"internal error during the forward pass: {type(e).__name__}: {e}")
        elapsed = time.perf_counter() - t0
        self.spec_stats["draft_time_s"] += result.draft_time_s
        if sched.spec_token_ids:
            self.spec_stats["verify_time_s"] += elapsed - result.draft_time_s
        touched = self.scheduler.update(sched, result)
        if sched.spec_token_ids:
            self._record_spec(sched, result)
        self.scheduler.update_draft_token_ids(result.draft_token_ids)
        now = time.monotonic()
        dirty: dict[str, _Parent] = {}
        for req in touched:
            parent = self._owner[req.request_id]
            sample = parent.samples[req.sample_index]
            new = result.sampled_token_ids[req.request_id]
            parent.first_token = parent.first_token or now
            if sample.logprobs is not None:
                self._add_logprobs(sample, result.logprobs[req.request_id], result.sampled_logprobs[req.request_id])
            sample.detok.add(new)
            if sample.detok.stopped_by is not None and not req.is_finished:
                req.stop_reason = sample.detok.stopped_by
                self.scheduler.finish_requests([req.request_id], RequestStatus.FINISHED_STOPPED)
            dirty[parent.request_id] = parent
        best_of_pending = [p for p in dirty.values() if p.params.num_samples > p.params.n and not p.finished]
        return [self._emit(p, now) for p in dirty.values() if p not in best_of_pending]

    def _record_spec(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> None:
        for rid, draft in sched.spec_token_ids.items():
            rejected = result.num_rejected.get(rid, len(draft))
            self.spec_stats["steps"] += 1
            self.spec_stats["draft_tokens"] += len(draft)
            self.spec_stats["accepted_tokens"] += len(draft) - rejected

    def spec_summary(self) -> dict[str, float]:
        """``spec_stats`` (request-steps that verified drafts, draft and accepted tokens, seconds spent drafting
        and in verifying steps) plus ``acceptance_rate`` (accepted / draft tokens) and ``mean_acceptance_length``
        (tokens per verifying request-step, the bonus token included: 1 + accepted / steps, as vLLM defines it);
        the rates are 0 before any speculation."""
        st = dict(self.spec_stats)
        st["acceptance_rate"] = st["accepted_tokens"] / st["draft_tokens"] if st["draft_tokens"] else 0.0
        st["mean_acceptance_length"] = 1 + st["accepted_tokens"] / st["steps"] if st["steps"] else 0.0
        return st

    def _fail(self, sched: SchedulerOutput, message: str) -> list[RequestOutput]:
        parents = {self._owner[rid].request_id: self._owner[rid] for rid in sched.req_ids if rid in self._owner}
        out = []
        for p in parents.values():
            p.error = message
            self.scheduler.finish_requests([s.req.request_id for s in p.samples], RequestStatus.FINISHED_ERROR)
            out.append(self._emit(p, time.monotonic()))
        return out

    def _add_logprobs(self, sample: _Sample, tops: list[dict[int, float]], chosen: list[float]) -> None:
        assert sample.logprobs is not None and sample.cumulative_logprob is not None
        for top, lp in zip(tops, chosen):
            ranked = sorted(top.items(), key=lambda kv: -kv[1])
            sample.logprobs.append({t: Logprob(v, rank + 1, sample.detok.token_text(t))
                                    for rank, (t, v) in enumerate(ranked)})
            sample.cumulative_logprob += lp

    def _emit(self, parent: _Parent, now: float) -> RequestOutput:
        finished = parent.finished
        outs = []
        for i, s in enumerate(parent.samples):
            done = s.req.is_finished
            outs.append(CompletionOutput(
                index=i, text=s.detok.visible_text(done), token_ids=list(s.req.output_token_ids),
                cumulative_logprob=s.cumulative_logprob,
                logprobs=list(s.logprobs) if s.logprobs is not None else None,
                finish_reason=s.req.finish_reason, stop_reason=s.req.stop_reason))
        if finished and len(outs) > parent.params.n:  # best_of: keep the n most likely samples
            outs = sorted(outs, key=lambda o: -(o.cumulative_logprob or 0.0))[:parent.params.n]
            for i, o in enumerate(outs):
                o.index = i
                if parent.params.logprobs is None:
                    o.logprobs, o.cumulative_logprob = None, None
        if finished:
            self._parents.pop(parent.request_id, None)
            for s in parent.samples:
                self._owner.pop(s.req.request_id, None)
        metrics = {"arrival": parent.arrival, "now": now}
        if parent.first_token is not None:
            metrics["ttft_s"] = parent.first_token - parent.arrival
        if finished:
            metrics["e2e_s"] = now - parent.arrival
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, outs, finished,
                             parent.error, parent.samples[0].req.num_cached_tokens, metrics)
