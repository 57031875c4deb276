"""The synchronous engine: add requests, call ``step()`` until done. Each step schedules, has the worker run
the model once, updates request state, detokenizes and returns the outputs that changed.

The engine imports no torch: the device, the model, the KV tensors, sampling and speculation belong to the
worker (:mod:`fastinfer.worker`), which it reaches only with plain data (``SchedulerOutput`` in,
``ModelRunnerOutput`` out)."""
from __future__ import annotations

import concurrent.futures
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
from fastinfer.distributed import ExecutorFailed
from fastinfer.engine.detokenizer import IncrementalDetokenizer
from fastinfer.outputs import CompletionOutput, Logprob, RequestOutput
from fastinfer.sampling_params import SamplingParams

logger = logging.getLogger("fastinfer")

PromptType = str | list[int] | dict[str, Any]

GRAMMAR_COMPILE_TIMEOUT_S = 30.0  # a structured-output grammar that takes longer fails its request


@dataclass
class _Sample:
    """Engine-side state of one sample (one core ``Request``)."""

    req: Request
    detok: IncrementalDetokenizer
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    num_detokenized: int = 0  # output tokens handed to ``detok`` so far


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
    grammar: concurrent.futures.Future | None = None  # structured outputs: compiling, not yet scheduled
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # filled as prefill chunks are computed

    @property
    def finished(self) -> bool:
        return all(s.req.is_finished for s in self.samples)


class LLMEngine:
    """Owns the model, the KV cache, the scheduler and the tokenizer of one served model."""

    def __init__(self, config: EngineConfig) -> None:
        from fastinfer.worker.executor import make_executor  # one in-process Worker, or tensor-parallel ranks

        self.config = config
        self.worker = make_executor(config)
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
        self._compiling: dict[str, _Parent] = {}  # structured-output requests whose grammar is compiling
        self._grammar_pool: concurrent.futures.ThreadPoolExecutor | None = None
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
        params = self._check_logit_rules(params)
        if params.structured_outputs is not None:
            self.worker.check_grammar(params.structured_outputs)  # ValueError before anything is queued
        parent = _Parent(request_id, text, ids, params)
        if params.prompt_logprobs is not None:
            parent.prompt_logprobs = [None] * len(ids)
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
        for s in parent.samples:
            self._owner[s.req.request_id] = parent
        self._parents[request_id] = parent
        if params.structured_outputs is not None:  # scheduled once its grammar is compiled (off this thread)
            if self._grammar_pool is None:
                self._grammar_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fastinfer-grammar")
            parent.grammar = self._grammar_pool.submit(self.worker.compile_grammar, params.structured_outputs)
            self._compiling[request_id] = parent
        else:
            self._schedule_parent(parent)

    def _schedule_parent(self, parent: _Parent) -> None:
        leader = parent.samples[0].req
        for s in parent.samples:
            self.scheduler.add_request(s.req, fork_from=None if s.req is leader else leader)

    def _check_logit_rules(self, params: SamplingParams) -> SamplingParams:
        """Token ids of logit_bias / allowed_token_ids within the vocabulary; bad_words tokenized (each word with
        and without a leading space, as it can appear mid-text) into ``bad_words_token_ids``."""
        params.check_token_ids(self.model_config.vocab_size)
        if not params.bad_words:
            return params
        words: list[list[int]] = []
        for w in params.bad_words:
            for text in (w.lstrip(), " " + w.lstrip()):
                toks = list(self.tokenizer.encode(text, add_special_tokens=False))
                if toks and toks not in words:
                    words.append(toks)
        return dataclasses.replace(params, bad_words_token_ids=words)

    def _admit_compiled(self, wait: bool) -> list[RequestOutput]:
        """Structured-output requests whose grammar finished compiling join the scheduler; a failed (invalid
        grammar) or too slow compile fails its request. ``wait``: block briefly for one (nothing else to run)."""
        if not self._compiling:
            return []
        if wait:
            concurrent.futures.wait([p.grammar for p in self._compiling.values() if p.grammar is not None],
                                    timeout=0.05, return_when=concurrent.futures.FIRST_COMPLETED)
        out, now = [], time.monotonic()
        for rid, parent in list(self._compiling.items()):
            fut = parent.grammar
            assert fut is not None
            e = fut.exception() if fut.done() else None
            if fut.done() and e is None:
                del self._compiling[rid]
                parent.grammar = None
                self._schedule_parent(parent)
            elif fut.done() or now - parent.arrival > GRAMMAR_COMPILE_TIMEOUT_S:
                del self._compiling[rid]
                parent.error = (str(e) if isinstance(e, ValueError) else
                                f"structured outputs: grammar compilation failed: {e!r}" if e is not None else
                                f"structured outputs: grammar compilation took longer than "
                                f"{GRAMMAR_COMPILE_TIMEOUT_S:.0f} s")
                for s in parent.samples:
                    s.req.status = RequestStatus.FINISHED_ERROR
                out.append(self._emit(parent, now))
        return out

    def abort_request(self, request_ids: str | Sequence[str]) -> None:
        """Stop requests (e.g. a client went away); their KV blocks are freed at once."""
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            parent = self._parents.pop(rid, None)
            if parent is None:
                continue
            if self._compiling.pop(rid, None) is not None:
                for s in parent.samples:
                    s.req.status = RequestStatus.FINISHED_ABORTED
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

    def check_health(self) -> None:
        """Raise :class:`~fastinfer.distributed.ExecutorFailed` when the executor cannot run (a tensor-parallel
        rank died or hung); returns quietly otherwise."""
        check = getattr(self.worker, "check_health", None)
        if check is not None:
            check()

    def worker_pids(self) -> list[int]:
        """Process ids of the tensor-parallel worker ranks this engine started ([] without tensor parallelism)."""
        pids = getattr(self.worker, "worker_pids", None)
        return list(pids()) if pids is not None else []

    def shutdown(self) -> None:
        """Stop the executor's worker processes (tensor parallelism; nothing to do for one in-process worker)."""
        stop = getattr(self.worker, "shutdown", None)
        if stop is not None:
            stop()

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    def get_num_unfinished_requests(self) -> int:
        return len(self._parents)

    # -- the loop --------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; returns an output for every request that changed."""
        admitted = self._admit_compiled(wait=not self.scheduler.has_unfinished_requests())
        sched = self.scheduler.schedule()
        if sched.is_empty():
            if sched.finished_req_ids or sched.preempted_req_ids:
                self.worker.execute(sched)  # let the worker drop what it held for them
            return admitted
        self.num_steps += 1
        t0 = time.perf_counter()
        try:
            result = self.worker.execute(sched)
        except ExecutorFailed:  # a tensor-parallel rank is gone: nothing more can run
            raise
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
        for rid, (start, rows) in result.prompt_logprobs.items():
            self._add_prompt_logprobs(self._owner[rid], start, rows)
        for req in touched:
            parent = self._owner[req.request_id]
            sample = parent.samples[req.sample_index]
            new = req.output_token_ids[sample.num_detokenized:]  # what the scheduler kept (not past a stop)
            sample.num_detokenized = req.num_output_tokens
            parent.first_token = parent.first_token or now
            if sample.logprobs is not None:
                self._add_logprobs(sample, result.logprobs[req.request_id], result.sampled_logprobs[req.request_id])
            if (req.status == RequestStatus.FINISHED_STOPPED and not isinstance(req.stop_reason, str)
                    and not req.sampling_params.include_stop_str_in_output):
                new = new[:-1]  # the EOS / stop token that ended it: its text is not part of the output (as vLLM)
            sample.detok.add(new)
            if sample.detok.stopped_by is not None and not req.is_finished:
                req.stop_reason = sample.detok.stopped_by
                self.scheduler.finish_requests([req.request_id], RequestStatus.FINISHED_STOPPED)
            dirty[parent.request_id] = parent
        best_of_pending = [p for p in dirty.values() if p.params.num_samples > p.params.n and not p.finished]
        return admitted + [self._emit(p, now) for p in dirty.values() if p not in best_of_pending]

    def _add_prompt_logprobs(self, parent: _Parent, start: int, rows: list[dict[int, tuple[float, int]]]) -> None:
        """Positions ``start ..`` of the prompt (kept from their first computation: a recompute after preemption
        or a sibling sample's prefill gives the same values)."""
        lps = parent.prompt_logprobs
        if lps is None:
            return
        detok = parent.samples[0].detok
        for j, row in enumerate(rows):
            if lps[start + j] is None:
                lps[start + j] = {t: Logprob(v, r, detok.token_text(t)) for t, (v, r) in row.items()}

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
        prompt_lps = list(parent.prompt_logprobs) if parent.prompt_logprobs is not None else None
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, outs, finished,
                             parent.error, parent.samples[0].req.num_cached_tokens, metrics, prompt_lps)
