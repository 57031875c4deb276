"""Runs one scheduled step on the device: updates the worker's request states from the plain-data
:class:`SchedulerOutput`, packs the inputs and builds the attention metadata once, runs the model, samples the
requests whose computed tokens caught up with their total (or verifies their drafts), then lets the
:class:`~fastinfer.worker.spec_decode.Speculator` propose drafts for the next step."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from fastinfer.core.outputs import ModelRunnerOutput, SchedulerOutput
from fastinfer.models.interface import CausalLM, KVCaches
from fastinfer.ops import OpSet
from fastinfer.sampling_params import StructuredOutputsParams
from fastinfer.structured_output import GrammarCompiler, GrammarState, new_bitmask
from fastinfer.worker.decode_graphs import DecodeGraphs
from fastinfer.worker.input_batch import CachedRequestState, Chunk, PackedInputs, pack_inputs
from fastinfer.worker.kv_cache import KVCacheLayout
from fastinfer.worker.rejection_sampler import VerifyOutput, rejection_sample
from fastinfer.worker.sampler import SamplerOutput, sample
from fastinfer.worker.spec_decode import Speculator

logger = logging.getLogger("fastinfer")


class ModelRunner:
    """The target model, its KV cache, the worker's request states and, with speculation, the speculator."""

    def __init__(self, model: CausalLM, kv_caches: KVCaches, block_size: int, ops: OpSet,
                 device: torch.device, generator: torch.Generator | None = None,
                 speculator: Speculator | None = None, kv_layout: KVCacheLayout | None = None,
                 grammars: GrammarCompiler | None = None) -> None:
        """``generator`` draws the random keys of unseeded requests (None: the device's default generator);
        ``kv_layout`` gives the KV cache groups (None: one group for every layer); ``grammars`` compiles (or
        finds in its cache) the grammars of structured-output requests."""
        self.model, self.kv_caches, self.block_size, self.ops, self.device = model, kv_caches, block_size, ops, device
        self.group_of_window = None if kv_layout is None or len(kv_layout.windows) == 1 else kv_layout.group_of_window
        self.layer_groups = kv_layout.layer_groups if kv_layout is not None else (0,) * len(kv_caches)
        model.bind_kv_cache(kv_caches)
        self.generator = generator
        self.speculator = speculator
        self.grammars = grammars
        self.decode_graphs: DecodeGraphs | None = None  # set by the worker: fixed-size decode steps
        self.requests: dict[str, CachedRequestState] = {}

    def _update_states(self, sched: SchedulerOutput) -> None:
        gone = sched.finished_req_ids + sched.preempted_req_ids
        for rid in gone:
            st = self.requests.pop(rid, None)
            if st is not None:
                st.is_finished = True
        if self.speculator is not None and gone:
            self.speculator.drop(gone)
        for new in sched.new_reqs:
            old = self.requests.get(new.req_id)
            if old is not None:
                old.is_finished = True
            st = self.requests[new.req_id] = CachedRequestState(new)
            if new.sampling_params.structured_outputs is not None:
                st.grammar = self._grammar_state(new.sampling_params.structured_outputs)
                st.grammar.accept(st.output_token_ids)  # resumed after preemption: replay what it generated

    def _grammar_state(self, so: StructuredOutputsParams) -> GrammarState:
        if self.grammars is None:
            raise ValueError("this model runner has no grammar compiler (structured outputs unavailable)")
        start = self.grammars.token_ids(so.reasoning_end) if so.reasoning_end else None
        return GrammarState(self.grammars.compile(so), start)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """One step: :meth:`prepare` (host bookkeeping, packed inputs), :meth:`run` (the device work, no
        synchronisation), :meth:`finish` (the step's one device-to-host copy, then drafts for the next step)."""
        if sched.is_empty():
            self._update_states(sched)
            return ModelRunnerOutput()
        t0 = time.perf_counter()
        step = self.prepare(sched)
        out = self.finish(step, self.run(step))
        if self.speculator is not None:
            if all(n == 1 + len(sched.spec_token_ids.get(rid, ()))
                   for rid, n in zip(sched.req_ids, sched.num_scheduled_tokens)):  # decode / verify only
                self.speculator.record_step_time(time.perf_counter() - t0)
            done = [i for i, rid in enumerate(sched.req_ids) if rid in out.sampled_token_ids]
            t1 = time.perf_counter()
            out.draft_token_ids = self.speculator.propose([step.states[i] for i in done],
                                                          [sched.block_ids[i] for i in done], len(self.requests))
            out.draft_time_s = time.perf_counter() - t1
        return out

    def prepare(self, sched: SchedulerOutput) -> StepInputs:
        """Copy-on-write block copies, then this step's packed inputs and attention metadata (built once)."""
        self._update_states(sched)
        if sched.blocks_to_copy:  # copy-on-write forks, before anything writes this step
            by_group: dict[int, list[tuple[int, int]]] = {}
            for g, src, dst in sched.blocks_to_copy:
                by_group.setdefault(g, []).append((src, dst))
            pairs = {g: torch.tensor(p, dtype=torch.int64).to(self.device) for g, p in by_group.items()}  # [N, 2]
            for (k, v), g in zip(self.kv_caches, self.layer_groups):
                if g in pairs:
                    self.ops.copy_blocks(k, v, pairs[g])
        states = [self.requests[rid] for rid in sched.req_ids]
        chunks, sample_idx, spec_idx, prompt_lp_idx = [], [], [], []
        for i, (st, n, start) in enumerate(zip(states, sched.num_scheduled_tokens, sched.num_computed_tokens)):
            if st.sampling_params.prompt_logprobs is not None and start + 1 < st.num_prompt_tokens:
                prompt_lp_idx.append(i)
            st.num_computed_tokens = start
            draft = sched.spec_token_ids.get(st.request_id, [])
            known = st.all_token_ids[start:start + n]  # slice only this step's tokens (no full-list copy)
            chunks.append(Chunk(known + draft[:n - len(known)], start, sched.block_ids[i]))
            if draft:  # verify: logits at the last real token and at every draft
                spec_idx.append(i)
            elif start + n == st.num_tokens:  # caught up: the last position's logits give the next token
                sample_idx.append(i)
        packed = pack_inputs(chunks, self.block_size, self.device, self.group_of_window)
        return StepInputs(sched, states, packed, sample_idx, spec_idx, prompt_lp_idx)

    def run(self, step: StepInputs) -> StepDeviceOutput:
        """Forward, logits of the rows that sample or verify, sampling and batched verification: device tensors
        only (nothing here waits for the device)."""
        sched, states, packed = step.sched, step.states, step.packed
        graphs = self.decode_graphs
        if graphs is not None and graphs.supports(packed.meta):  # a pure decode step: padded, replayed
            hidden = graphs.run(packed.input_ids, packed.positions, packed.meta)
        else:
            hidden = self.model.forward(packed.input_ids, packed.positions, packed.meta)  # [T, hidden]
        rows = [packed.last_rows[i] for i in step.sample_idx]
        drafts = [sched.spec_token_ids[states[i].request_id] for i in step.spec_idx]
        for i, d in zip(step.spec_idx, drafts):
            rows.extend(range(packed.last_rows[i] - len(d), packed.last_rows[i] + 1))
        out = StepDeviceOutput(nonfinite=_nonfinite_per_chunk(hidden, packed.first_rows, packed.last_rows))
        if step.prompt_lp_idx:
            out.prompt_logprobs = self._prompt_logprobs(hidden, step)
        if not rows:
            return out
        idx = torch.tensor(rows, dtype=torch.int64).to(self.device)
        logits = self.model.compute_logits(hidden.index_select(0, idx))  # [S + sum(k + 1), V] fp32
        s = len(step.sample_idx)
        self._apply_grammars(logits, step, drafts)
        if s:
            out.sampled = sample(logits.narrow(0, 0, s), [states[i] for i in step.sample_idx], self.generator,
                                 self.ops.argmax)
        if step.spec_idx:
            assert self.speculator is not None
            spec_states = [states[i] for i in step.spec_idx]
            q = [self.speculator.draft_probs(st, d) for st, d in zip(spec_states, drafts)]
            out.verified = rejection_sample(logits.narrow(0, s, len(rows) - s), drafts, spec_states, q, self.generator)
        return out

    def _apply_grammars(self, logits: torch.Tensor, step: StepInputs, drafts: list[list[int]]) -> None:
        """Structured outputs: each grammar request's rows of ``logits`` (its sample row, or one row per draft
        position plus the bonus row) keep only the tokens its grammar allows there; one batched op."""
        states = step.states
        if all(states[i].grammar is None for i in step.sample_idx + step.spec_idx):
            return
        bitmask = new_bitmask(logits.shape[0], logits.shape[1])  # all ones: rows without a grammar stay untouched
        for j, i in enumerate(step.sample_idx):
            if states[i].grammar is not None:
                states[i].grammar.fill(bitmask, j)
        r = len(step.sample_idx)
        for i, d in zip(step.spec_idx, drafts):
            if states[i].grammar is not None:
                states[i].grammar.fill_with_draft(bitmask, r, d)
            r += len(d) + 1
        self.ops.apply_token_bitmask(logits, bitmask.to(logits.device, non_blocking=True))

    def _prompt_logprobs(self, hidden: torch.Tensor, step: StepInputs) -> list[PromptLogprobsPart]:
        """Per chunk that holds prompt positions of a request asking for prompt logprobs: the logprob and rank of
        each next prompt token under the logits of the row before it, and the top-k alternatives (device
        tensors; logits computed a slice of rows at a time to bound memory)."""
        parts = []
        for i in step.prompt_lp_idx:
            st, start = step.states[i], step.sched.num_computed_tokens[i]
            n = step.sched.num_scheduled_tokens[i]
            m = min(n, st.num_prompt_tokens - 1 - start)  # rows whose next token is still a prompt token
            first = step.packed.first_rows[i]
            target_ids = st.prompt_token_ids[start + 1:start + 1 + m]
            targets = torch.tensor(target_ids, dtype=torch.int64).to(self.device)
            k = st.sampling_params.prompt_logprobs or 0
            lp, rank, top_v, top_i = [], [], [], []
            for a in range(0, m, PROMPT_LOGPROB_ROWS):
                b = min(m, a + PROMPT_LOGPROB_ROWS)
                lps = self.model.compute_logits(hidden.narrow(0, first + a, b - a)).float().log_softmax(dim=-1)
                tgt = lps.gather(1, targets[a:b, None])  # [rows, 1]
                lp.append(tgt.squeeze(1))
                rank.append((lps > tgt).sum(dim=-1) + 1)
                if k:
                    v, ids = lps.topk(min(k, lps.shape[1]), dim=-1)
                    top_v.append(v)
                    top_i.append(ids)
            parts.append(PromptLogprobsPart(st.request_id, start + 1, target_ids, torch.cat(lp), torch.cat(rank),
                                            torch.cat(top_v) if k else None, torch.cat(top_i) if k else None))
        return parts

    def finish(self, step: StepInputs, dev: StepDeviceOutput) -> ModelRunnerOutput:
        """The one device-to-host copy of the step (sampled and verified ids with the non-finite flags; a
        second one only when a request asked for logprobs), then the states advance."""
        sched, states, out = step.sched, step.states, ModelRunnerOutput()
        parts = [dev.nonfinite.to(torch.int64)]
        sampled = dev.sampled
        with_logprobs = sampled is not None and sampled.logprob is not None
        if sampled is not None and not with_logprobs:
            parts.append(sampled.token_ids)
        if dev.verified is not None:
            parts += [dev.verified.num_accepted, dev.verified.token_ids.flatten()]
        host = torch.cat(parts).tolist()
        b = len(states)
        for st, flag in zip(states, host[:b]):
            if flag:
                out.nonfinite_req_ids.add(st.request_id)
        pos = b
        if sampled is not None:
            if with_logprobs:
                res = sampled.to_lists()
                tokens = res.token_ids
            else:
                tokens = host[pos:pos + len(step.sample_idx)]
                pos += len(step.sample_idx)
            for j, i in enumerate(step.sample_idx):
                rid = states[i].request_id
                out.sampled_token_ids[rid] = [tokens[j]]
                if with_logprobs and res.top_logprobs[j] is not None:
                    out.logprobs[rid] = [res.top_logprobs[j]]  # type: ignore[list-item]
                    out.sampled_logprobs[rid] = [res.logprob[j]]  # type: ignore[list-item]
        if dev.verified is not None:
            r = len(step.spec_idx)
            width = dev.verified.token_ids.shape[1]
            accepted, flat = host[pos:pos + r], host[pos + r:]
            for j, i in enumerate(step.spec_idx):
                st = states[i]
                draft = sched.spec_token_ids[st.request_id]
                tokens = flat[j * width:j * width + accepted[j] + 1]
                out.sampled_token_ids[st.request_id] = tokens
                out.num_rejected[st.request_id] = len(draft) - accepted[j]
                assert self.speculator is not None
                self.speculator.record_acceptance(st, len(draft), accepted[j])
        for part in dev.prompt_logprobs:
            out.prompt_logprobs[part.req_id] = part.to_host()
        for i, st in enumerate(states):
            new = out.sampled_token_ids.get(st.request_id)
            if new:
                st.append_output_tokens(new)
                if st.grammar is not None:
                    st.grammar.accept(new)
                st.num_computed_tokens = sched.num_computed_tokens[i] + sched.num_scheduled_tokens[i] - \
                    out.num_rejected.get(st.request_id, 0)
        return out


@dataclass
class StepInputs:
    """Host-side inputs of one step: the states of the scheduled requests (in scheduler order), the packed
    device inputs, and which requests sample (``sample_idx``) or verify drafts (``spec_idx``)."""

    sched: SchedulerOutput
    states: list[CachedRequestState]
    packed: PackedInputs
    sample_idx: list[int]
    spec_idx: list[int]
    prompt_lp_idx: list[int] = field(default_factory=list)  # chunks with prompt positions to score


PROMPT_LOGPROB_ROWS = 256  # prompt-logprob logits computed this many rows at a time


@dataclass
class PromptLogprobsPart:
    """Prompt logprobs of one chunk: positions ``start .. start + len(logprob) - 1`` of request ``req_id``."""

    req_id: str
    start: int
    token_ids: list[int]  # the m prompt tokens scored
    logprob: torch.Tensor  # [m] of each prompt token
    rank: torch.Tensor  # [m] its rank (1 = the most likely token)
    top_logprobs: torch.Tensor | None  # [m, k]
    top_ids: torch.Tensor | None  # [m, k]

    def to_host(self) -> tuple[int, list[dict[int, tuple[float, int]]]]:
        """(first position, per position {token id: (logprob, rank)}: the prompt token and the top k)."""
        lp, rank = self.logprob.tolist(), self.rank.tolist()
        tv = self.top_logprobs.tolist() if self.top_logprobs is not None else [[] for _ in lp]
        ti = self.top_ids.tolist() if self.top_ids is not None else [[] for _ in lp]
        rows = []
        for j, tok in enumerate(self.token_ids):
            d = {tok: (lp[j], rank[j])}
            d.update((t, (v, r + 1)) for r, (t, v) in enumerate(zip(ti[j], tv[j])) if t != tok)
            rows.append(d)
        return self.start, rows


@dataclass
class StepDeviceOutput:
    nonfinite: torch.Tensor  # [B] bool: a NaN/inf in the request's hidden states this step
    sampled: SamplerOutput | None = None
    verified: VerifyOutput | None = None
    prompt_logprobs: list[PromptLogprobsPart] = field(default_factory=list)


def _nonfinite_per_chunk(hidden: torch.Tensor, first_rows: list[int], last_rows: list[int]) -> torch.Tensor:
    """[B] bool: whether any hidden row of chunk b (rows first_rows[b]..last_rows[b]) has a NaN/inf. Such requests
    must never publish KV blocks to the prefix cache."""
    if len(first_rows) == hidden.shape[0]:  # one row per chunk (decode): the rows are the chunks, in order
        return torch.isfinite(hidden).all(dim=-1).logical_not()
    bad = torch.isfinite(hidden).all(dim=-1).logical_not().to(torch.int32)  # [T]
    csum = torch.cat([bad.new_zeros(1), bad.cumsum(0)])  # [T + 1]
    lo = torch.tensor(first_rows, dtype=torch.int64).to(hidden.device)
    hi = torch.tensor([r + 1 for r in last_rows], dtype=torch.int64).to(hidden.device)
    return csum.index_select(0, hi) > csum.index_select(0, lo)
