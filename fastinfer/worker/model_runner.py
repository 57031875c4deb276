"""Runs one scheduled step: builds the packed inputs and attention metadata once, runs the model,
samples the requests whose computed tokens caught up with their total (or verifies their drafts). Also runs
the speculative proposer between steps and keeps the draft distributions until verification."""
from __future__ import annotations

import itertools
import logging

import torch

from fastinfer.config import ModelConfig
from fastinfer.core.request import Request
from fastinfer.core.scheduler import ModelRunnerOutput, SchedulerOutput
from fastinfer.models.llama import LlamaForCausalLM, new_kv_caches
from fastinfer.ops import AttentionMetadata, OpSet
from fastinfer.worker.sampler import sample
from fastinfer.worker.spec_decode import Draft, Proposer, verify

logger = logging.getLogger("fastinfer")


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    elem = torch.empty(0, dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elem


class ModelRunner:
    """The target model, its KV cache and, with speculation, the proposer (see :meth:`propose`)."""

    def __init__(self, model: LlamaForCausalLM, cfg: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, ops: OpSet, device: torch.device | str = "cpu", seed: int = 0,
                 proposer: Proposer | None = None) -> None:
        self.ops = ops
        self.model, self.cfg, self.block_size, self.device = model, cfg, block_size, torch.device(device)
        self.kv_caches = new_kv_caches(cfg, num_blocks, block_size, dtype, device)
        model.bind_kv_cache(self.kv_caches)
        self.generator = torch.Generator().manual_seed(seed)
        self.proposer = proposer
        self._drafts: dict[str, tuple[Request, Draft]] = {}  # proposed, not yet verified (or re-proposed)

    def propose(self, reqs: list[Request], ks: list[int], block_ids: list[list[int]]) -> list[list[int]]:
        """Draft tokens for ``reqs`` (see :class:`~fastinfer.worker.spec_decode.Proposer`); their draft
        distributions are kept for the step that verifies them."""
        assert self.proposer is not None
        for rid in [rid for rid, (r, _) in self._drafts.items() if r.is_finished]:
            del self._drafts[rid]
        drafts = self.proposer.propose(reqs, ks, block_ids)
        for req, d in zip(reqs, drafts):
            self._drafts[req.request_id] = (req, d)
        return [d.token_ids for d in drafts]

    def _draft_probs(self, req: Request, draft: list[int]) -> torch.Tensor | None:
        """q rows [len(draft), V] of the drafts being verified (None: deterministic drafts or greedy)."""
        entry = self._drafts.pop(req.request_id, None)
        if entry is None or entry[0] is not req or entry[1].token_ids[:len(draft)] != draft:
            if req.sampling_params.greedy:
                return None  # exact match needs no q
            raise RuntimeError(f"request {req.request_id}: the drafts to verify are not the proposed ones")
        probs = entry[1].probs
        return None if probs is None else probs[:len(draft)]

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        if sched.blocks_to_copy:  # copy-on-write forks, before anything writes this step
            pairs = torch.tensor(sched.blocks_to_copy, dtype=torch.int64, device=self.device)  # [N, 2]
            for k, v in self.kv_caches:
                self.ops.copy_blocks(k, v, pairs)
        order = sorted(range(len(sched.reqs)), key=lambda i: sched.num_scheduled_tokens[i] != 1)  # decodes first
        input_ids: list[int] = []
        positions: list[int] = []
        query_lens, seq_lens, block_ids, sample_rows, sample_reqs = [], [], [], [], []
        spec_rows: list[tuple[Request, list[int], list[int]]] = []  # (request, drafts, logits rows)
        for i in order:
            req, n = sched.reqs[i], sched.num_scheduled_tokens[i]
            start = req.num_computed_tokens
            draft = sched.spec_token_ids.get(req.request_id, [])
            known = req.all_token_ids[start:start + n]  # slice only this step's tokens (no full-list copy)
            input_ids.extend(known)
            input_ids.extend(draft[:n - len(known)])
            positions.extend(range(start, start + n))
            query_lens.append(n)
            seq_lens.append(start + n)
            block_ids.append(sched.block_ids[i])
            if draft:  # verify: logits at the last real token and at every draft
                spec_rows.append((req, draft, list(range(len(input_ids) - len(draft) - 1, len(input_ids)))))
            elif start + n == req.num_tokens:  # caught up: the last position's logits give the next token
                sample_rows.append(len(input_ids) - 1)
                sample_reqs.append(req)
        meta = AttentionMetadata.build(query_lens, seq_lens, block_ids, self.block_size, self.device)
        hidden = self.model(torch.tensor(input_ids, device=self.device),
                            torch.tensor(positions, device=self.device), meta)  # [T, hidden]
        out = ModelRunnerOutput()
        bad = ~torch.isfinite(hidden).all(dim=-1)  # [T]
        if bool(bad.any()):  # such requests must never publish KV blocks to the prefix cache
            offsets = [0, *itertools.accumulate(query_lens)]
            flags = bad.tolist()
            for j, i in enumerate(order):
                if any(flags[offsets[j]:offsets[j + 1]]):
                    out.nonfinite_req_ids.add(sched.reqs[i].request_id)
        for req, draft, rows in spec_rows:
            tokens = verify(self.model.compute_logits(hidden[rows]), draft, req, self.generator,  # [k+1, V]
                            self._draft_probs(req, draft))
            out.sampled_token_ids[req.request_id] = tokens
            out.num_rejected[req.request_id] = len(draft) - (len(tokens) - 1)
        if not sample_reqs:
            return out
        logits = self.model.compute_logits(hidden[sample_rows])  # [S, vocab] fp32
        res = sample(logits, sample_reqs, self.generator)
        for j, req in enumerate(sample_reqs):
            out.sampled_token_ids[req.request_id] = [res.token_ids[j]]
            top = res.top_logprobs[j]
            if top is not None:
                out.logprobs[req.request_id] = [top]
                out.sampled_logprobs[req.request_id] = [res.logprob[j]]  # type: ignore[list-item]
        return out
