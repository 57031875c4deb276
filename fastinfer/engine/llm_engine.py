"""The synchronous engine: add requests, call ``step()`` until done. Each step schedules, runs the model
once, updates request state, detokenizes and returns the outputs that changed."""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fastinfer.config import EngineConfig, SpeculativeConfig
from fastinfer.core.kv_cache_manager import KVCacheManager, cdiv
from fastinfer.core.request import Request, RequestStatus
from fastinfer.core.scheduler import Scheduler, SchedulerOutput
from fastinfer.engine.detokenizer import IncrementalDetokenizer
from fastinfer.models.loader import LoadedModel, load_model
from fastinfer.ops import OpSet
from fastinfer.outputs import CompletionOutput, Logprob, RequestOutput
from fastinfer.sampling_params import SamplingParams
from fastinfer.worker.draft_model import DraftModelProposer
from fastinfer.worker.model_runner import ModelRunner, kv_bytes_per_token
from fastinfer.worker.spec_decode import NgramProposer, Proposer, speculation_allowed

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
        self.config = config
        device = torch.device(config.device)
        self.ops = OpSet(device.type, config.attention_backend)
        loaded = load_model(config.model, config.dtype, self.ops, config.max_model_len, config.tokenizer,
                            config.load_progress, quantization=config.quantization)
        self.model_config = cfg = loaded.config
        self.tokenizer = loaded.tokenizer
        self.load_seconds = loaded.load_seconds
        self.dtype = loaded.dtype
        self.max_model_len = config.max_model_len or cfg.max_position_embeddings
        self.spec = (SpeculativeConfig.from_dict(dict(config.speculative_config))
                     if config.speculative_config is not None else None)
        draft = self._load_draft(self.spec, loaded) if self.spec is not None else None
        bs = config.block_size
        # the draft model's KV cache uses the same blocks: size the two together
        block_bytes = (kv_bytes_per_token(cfg, loaded.dtype)
                       + (kv_bytes_per_token(draft.config, draft.dtype) if draft is not None else 0)) * bs
        if config.num_kv_blocks is not None:
            num_blocks, why = config.num_kv_blocks, "num_kv_blocks"
        elif config.kv_cache_memory_bytes is not None:
            num_blocks, why = config.kv_cache_memory_bytes // block_bytes, "kv_cache_memory_bytes"
        else:
            wanted = config.max_num_seqs * cdiv(self.max_model_len, bs)
            num_blocks = min(wanted, EngineConfig.DEFAULT_KV_BYTES // block_bytes)
            why = (f"max_num_seqs x max_model_len = {config.max_num_seqs} x {self.max_model_len}"
                   + ("" if num_blocks == wanted else f", capped at {EngineConfig.DEFAULT_KV_BYTES >> 30} GiB"))
        if num_blocks * bs < self.max_model_len:
            raise ValueError(f"a KV cache of {num_blocks} blocks x {bs} tokens cannot hold one sequence of "
                             f"max_model_len={self.max_model_len}; give more KV memory or a smaller max_model_len")
        logger.info("KV cache: %d blocks x %d tokens = %d tokens, %.2f GiB (%s%s); %.1f full-length sequences",
                    num_blocks, bs, num_blocks * bs, num_blocks * block_bytes / 2**30, why,
                    ", with the draft model's" if draft is not None else "", num_blocks * bs / self.max_model_len)
        self.num_kv_blocks = num_blocks
        self.kv = KVCacheManager(num_blocks, bs, config.enable_prefix_caching)
        budget = config.max_num_batched_tokens or max(2048, config.max_num_seqs)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, budget, self.max_model_len)
        self.proposer: Proposer | None = None
        if self.spec is not None and draft is None:
            self.proposer = NgramProposer(self.spec.prompt_lookup_max, self.spec.prompt_lookup_min)
        elif draft is not None:
            self.proposer = DraftModelProposer(draft.model, draft.config, num_blocks, bs, draft.dtype, device,
                                               config.seed, budget, config.enable_prefix_caching)
        self.runner = ModelRunner(loaded.model, cfg, num_blocks, bs, loaded.dtype, self.ops, device, config.seed,
                                  self.proposer)
        self.eos_token_ids = cfg.eos_token_ids or tuple(
            t for t in [getattr(self.tokenizer, "eos_token_id", None)] if t is not None)
        # counters; acceptance rate = accepted / draft tokens, mean acceptance length = 1 + accepted / steps
        self.spec_stats: dict[str, float] = {"steps": 0, "draft_tokens": 0, "accepted_tokens": 0,
                                             "draft_time_s": 0.0, "verify_time_s": 0.0}
        self._parents: dict[str, _Parent] = {}
        self._owner: dict[str, _Parent] = {}  # core request id -> parent
        self.num_steps = 0
        self._step_s: float | None = None  # moving average of a decode / verify step of the target
        self._draft_step_s: float | None = None  # ... and of one draft-model step (its catch-up included)

    def _load_draft(self, spec: SpeculativeConfig, target: LoadedModel) -> LoadedModel | None:
        """The draft model of ``method="draft_model"`` (the target itself, quantized, when no model is given),
        in the target's dtype; raises ValueError unless it shares the target's vocabulary and context."""
        if spec.method != "draft_model":
            return None
        name = self.config.model if spec.self_draft else spec.model
        assert name is not None
        dtype = str(target.dtype).removeprefix("torch.")
        try:
            draft = load_model(name, dtype, self.ops, self.max_model_len, None, self.config.load_progress,
                               quantization=spec.draft_quantization)
        except ValueError as e:
            raise ValueError(f"speculative_config: cannot load the draft model {name!r}: {e}") from e
        tcfg, dcfg = target.config, draft.config
        if dcfg.vocab_size != tcfg.vocab_size:
            raise ValueError(f"speculative_config: the draft model {name!r} has a vocabulary of {dcfg.vocab_size} "
                             f"tokens, the target {tcfg.vocab_size}: a draft model must share the target's "
                             "tokenizer")
        if not spec.self_draft:
            tv, dv = _vocab(target.tokenizer), _vocab(draft.tokenizer)
            if tv is not None and dv is not None and tv != dv:
                raise ValueError(f"speculative_config: the draft model {name!r} has a different tokenizer "
                                 "(token ids map to other strings): a draft model must share the target's tokenizer")
        logger.info("speculative decoding: draft model %s%s, %d tokens per step", name,
                    f" ({spec.draft_quantization})" if spec.draft_quantization else "", spec.num_speculative_tokens)
        return draft

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

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    def get_num_unfinished_requests(self) -> int:
        return len(self._parents)

    # -- the loop --------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; returns an output for every request that changed."""
        sched = self.scheduler.schedule()
        if sched.is_empty():
            return []
        self.num_steps += 1
        t0 = time.perf_counter()
        try:
            result = self.runner.execute(sched)
        except Exception as e:  # keep serving: fail this batch's requests, loudly
            logger.exception("model step failed; failing the %d requests of this batch", len(sched.reqs))
            return self._fail(sched, f"internal error during the forward pass: {type(e).__name__}: {e}")
        elapsed = time.perf_counter() - t0
        if sched.spec_token_ids:
            self.spec_stats["verify_time_s"] += elapsed
        if all(n == 1 + len(sched.spec_token_ids.get(r.request_id, ()))
               for r, n in zip(sched.reqs, sched.num_scheduled_tokens)):  # decode / verify only: no prefill
            self._step_s = elapsed if self._step_s is None else 0.8 * self._step_s + 0.2 * elapsed
        touched = self.scheduler.update(sched, result)
        if sched.spec_token_ids:
            self._record_spec(sched, result)
        if self.spec is not None:
            self._propose()
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

    def _record_spec(self, sched: SchedulerOutput, result: Any) -> None:
        for rid, draft in sched.spec_token_ids.items():
            rejected = result.num_rejected.get(rid, len(draft))
            accepted = len(draft) - rejected
            self.spec_stats["steps"] += 1
            self.spec_stats["draft_tokens"] += len(draft)
            self.spec_stats["accepted_tokens"] += accepted
            req = self.scheduler.requests.get(rid)
            if req is not None:
                req.spec_acceptance = 0.7 * req.spec_acceptance + 0.3 * accepted / len(draft)

    def spec_summary(self) -> dict[str, float]:
        """``spec_stats`` (request-steps that verified drafts, draft and accepted tokens, seconds spent drafting
        and in verifying steps) plus ``acceptance_rate`` (accepted / draft tokens) and ``mean_acceptance_length``
        (tokens per verifying request-step, the bonus token included: 1 + accepted / steps, as vLLM defines it);
        the rates are 0 before any speculation."""
        st = dict(self.spec_stats)
        st["acceptance_rate"] = st["accepted_tokens"] / st["draft_tokens"] if st["draft_tokens"] else 0.0
        st["mean_acceptance_length"] = 1 + st["accepted_tokens"] / st["steps"] if st["steps"] else 0.0
        return st

    def _propose(self) -> None:
        """Give running requests drafts for the next step, adaptively: none while the batch is large (verifying
        costs compute there), fewer (or, for a draft model, none) for requests whose drafts keep failing."""
        spec, proposer = self.spec, self.proposer
        assert spec is not None and proposer is not None
        running = self.scheduler.running
        if len(running) > spec.disable_by_batch_size:
            return
        reqs, ks = [], []
        for req in running:
            if req.num_computed_tokens != req.num_tokens - 1 or not speculation_allowed(req):
                continue  # still prefilling, or sampling that depends on history
            sp = req.sampling_params
            room = min((sp.max_tokens or self.max_model_len) - req.num_output_tokens,
                       self.max_model_len - req.num_tokens) - 1
            k = min(self._draft_length(req, spec.num_speculative_tokens), room)
            # a draft model writes its KV up to position num_tokens + k - 2: reserve the target's slots for it
            if k > 0 and (not proposer.needs_kv_slots or self.kv.allocate_slots(req, k)):
                reqs.append(req)
                ks.append(k)
        if not reqs:
            return
        t0 = time.perf_counter()
        drafts = self.runner.propose(reqs, ks, [self.kv.req_blocks[r.request_id] for r in reqs])
        self.spec_stats["draft_time_s"] += time.perf_counter() - t0
        # the draft step cost is learnt without catch-ups: a long one (a new prompt, or tokens decoded while
        # drafting was off) is a one-off that would make drafting look too dear to ever resume
        per_step = getattr(proposer, "last_step_s", None)
        if proposer.needs_kv_slots and per_step is not None:
            self._draft_step_s = per_step if self._draft_step_s is None else 0.8 * self._draft_step_s + 0.2 * per_step
        for req, d in zip(reqs, drafts):
            req.spec_token_ids = d

    PROBE_EVERY = 64

    def _draft_length(self, req: Request, k_max: int) -> int:
        """Drafts to propose for ``req``. N-gram lookup is free: ``k_max``, or 1 while the request's acceptance
        (moving average ``a``) stays low. A draft model (``cost_aware``) costs ``c`` target steps per draft step
        (measured): the k in 0..k_max with the most expected tokens per unit of time,
        (1 - a^(k+1)) / (1 - a) / (1 + k c); when that is 0 (no drafts), one draft every PROBE_EVERY tokens
        keeps ``a`` up to date. No drafts while the draft's catch-up exceeds 4x the tokens the request has left."""
        a = req.spec_acceptance
        assert self.spec is not None and self.proposer is not None
        if not (self.proposer.needs_kv_slots and self.spec.cost_aware):
            return k_max if a >= 0.3 else 1
        lag = getattr(self.proposer, "lag", None)
        sp = req.sampling_params
        left = (sp.max_tokens or self.max_model_len) - req.num_output_tokens
        if lag is not None and lag(req) > 4 * left:
            return 0  # catching the draft up (e.g. when a large batch has shrunk) would cost more than it can save
        if self._step_s is None or self._draft_step_s is None:
            return k_max  # nothing measured yet
        c = self._draft_step_s / max(self._step_s, 1e-9)
        best_k, best = 0, 1.0
        for k in range(1, k_max + 1):
            tokens = k + 1 if a >= 0.999 else (1 - a ** (k + 1)) / (1 - a)
            rate = tokens / (1 + k * c)
            if rate > best:
                best_k, best = k, rate
        if best_k == 0 and req.num_output_tokens % self.PROBE_EVERY == 0:
            return 1
        return best_k

    def _fail(self, sched: SchedulerOutput, message: str) -> list[RequestOutput]:
        parents = {self._owner[r.request_id].request_id: self._owner[r.request_id] for r in sched.reqs}
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


def _vocab(tokenizer: Any) -> dict[str, int] | None:
    get = getattr(tokenizer, "get_vocab", None)
    return get() if callable(get) else None
