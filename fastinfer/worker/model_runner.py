"""Runs one scheduled step on the device: updates the worker's request states from the plain-data
:class:`SchedulerOutput`, packs the inputs and builds the attention metadata once, runs the model, samples the
requests whose computed tokens caught up with their total (or verifies their drafts), then lets the
:class:`~fastinfer.worker.spec_decode.Speculator` propose drafts for the next step."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from fastinfer.core.outputs import ModelRunnerOutput, SchedulerOutput
from fastinfer.models.interface import CausalLM, KVCaches
from fastinfer.ops import OpSet
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
                 speculator: Speculator | None = None, kv_layout: KVCacheLayout | None = None) -> None:
        """``generator`` draws the random keys of unseeded requests (None: the device's default generator);
        ``kv_layout`` gives the KV cache groups (None: one group for every layer)."""
        self.model, self.kv_caches, self.block_size, self.ops, self.device = model, kv_caches, block_size, ops, device
        self.group_of_window = None if kv_layout is None or len(kv_layout.windows) == 1 else kv_layout.group_of_window
        self.layer_groups = kv_layout.layer_groups if kv_layout is not None else (0,) * len(kv_caches)
        model.bind_kv_cache(kv_caches)
        self.generator = generator
        self.speculator = speculator
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
            self.requests[new.req_id] = CachedRequestState(new)

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
        chunks, sample_idx, spec_idx = [], [], []
        for i, (st, n, start) in enumerate(zip(states, sched.num_scheduled_tokens, sched.num_computed_tokens)):
            st.num_computed_tokens = start
            draft = sched.spec_token_ids.get(st.request_id, [])
            known = st.all_token_ids[start:start + n]  # slice only this step's tokens (no full-list copy)
            chunks.append(Chunk(known + draft[:n - len(known)], start, sched.block_ids[i]))
            if draft:  # verify: logits at the last real token and at every draft
                spec_idx.append(i)
            elif start + n == st.num_tokens:  # caught up: the last position's logits give the next token
                sample_idx.append(i)
        packed = pack_inputs(chunks, self.block_size, self.device, self.group_of_window)
        return StepInputs(sched, states, packed, sample_idx, spec_idx)

    def run(self, step: StepInputs) -> StepDeviceOutput:
        """Forward, logits of the rows that sample or verify, sampling and batched verification: device tensors
        only (nothing here waits for the device)."""
        sched, states, packed = step.sched, step.states, step.packed
        hidden = self.model.forward(packed.input_ids, packed.positions, packed.meta)  # [T, hidden]
        rows = [packed.last_rows[i] for i in step.sample_idx]
        drafts = [sched.spec_token_ids[states[i].request_id] for i in step.spec_idx]
        for i, d in zip(step.spec_idx, drafts):
            rows.extend(range(packed.last_rows[i] - len(d), packed.last_rows[i] + 1))
        out = StepDeviceOutput(nonfinite=_nonfinite_per_chunk(hidden, packed.first_rows, packed.last_rows))
        if not rows:
            return out
        idx = torch.tensor(rows, dtype=torch.int64).to(self.device)
        logits = self.model.compute_logits(hidden.index_select(0, idx))  # [S + sum(k + 1), V] fp32
        s = len(step.sample_idx)
        if s:
            out.sampled = sample(logits.narrow(0, 0, s), [states[i] for i in step.sample_idx], self.generator,
                                 self.ops.argmax)
        if step.spec_idx:
            assert self.speculator is not None
            spec_states = [states[i] for i in step.spec_idx]
            q = [self.speculator.draft_probs(st, d) for st, d in zip(spec_states, drafts)]
            out.verified = rejection_sample(logits.narrow(0, s, len(rows) - s), drafts, spec_states, q, self.generator)
        return out

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
        for i, st in enumerate(states):
            new = out.sampled_token_ids.get(st.request_id)
            if new:
                st.append_output_tokens(new)
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


@dataclass
class StepDeviceOutput:
    nonfinite: torch.Tensor  # [B] bool: a NaN/inf in the request's hidden states this step
    sampled: SamplerOutput | None = None
    verified: VerifyOutput | None = None


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
