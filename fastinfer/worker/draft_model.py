"""Draft-model speculation: a smaller model sharing the target's tokenizer (or a quantized copy of the target)
proposes k tokens per request, batched over all speculating requests (one packed varlen forward per draft step).

KV cache: the draft has its own tensors, [num_blocks, block_size, Hkv, D] per draft layer, with the SAME number
of blocks and block size as the target's, indexed by the SAME block tables and slot mappings: no allocator of
its own. The engine reserves the target's slots for the draft positions before proposing.

Per request the proposer keeps ``num_computed`` (the leading positions whose draft KV holds the request's real
tokens) and ``pending`` (the draft tokens whose KV it wrote after them). A proposal first catches up (prefill of
the prompt and accepted tokens the draft has not seen; the pending tokens that the target accepted count as
seen), which gives draft token 1, then runs k-1 single-token steps. Rejected positions are simply overwritten
later: rollback is lowering the counter, no copies. A preempted request (its blocks were freed) restarts.

Prefix caching: ``valid_blocks`` maps a block id to the hash of the full block whose draft KV it holds. Any draft
write into a block drops its entry; a catch-up that covers a full block records it. A request that starts from
cached target blocks (a prefix hit, a fork, a recompute after preemption) keeps the leading blocks whose entry
matches its own block hash and recomputes the rest with the draft. Lossless verification never depends on the
draft's KV (only acceptance does); this bookkeeping keeps the draft from reading stale or unwritten slots.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from fastinfer.models.interface import CausalLM, KVCaches
from fastinfer.worker.decode_graphs import DecodeGraphs
from fastinfer.worker.input_batch import Chunk, pack_inputs
from fastinfer.worker.rejection_sampler import draft_sample
from fastinfer.worker.spec_decode import Draft

Request = Any  # a request state (fastinfer.worker.input_batch.CachedRequestState or core Request)


@dataclass
class _DraftState:
    req: Request
    num_preemptions: int
    num_computed: int = 0  # leading positions whose draft KV holds the request's own tokens
    pending: list[int] = field(default_factory=list)  # draft tokens written at positions num_computed...
    num_recorded: int = 0  # leading blocks entered in valid_blocks (or found there) for this request


class DraftModelProposer:
    """Proposes with ``model`` (its own KV cache over the target's block layout). ``max_num_batched_tokens``
    bounds one catch-up forward; longer catch-ups are chunked."""

    needs_kv_slots = True

    def __init__(self, model: CausalLM, kv_caches: KVCaches, block_size: int, device: torch.device | str = "cpu",
                 seed: int = 0, max_num_batched_tokens: int = 2048, enable_caching: bool = True) -> None:
        self.model, self.block_size, self.device = model, block_size, torch.device(device)
        # Uninitialised like the target's: the draft reads only positions it wrote (see the module docstring).
        self.kv_caches = kv_caches
        model.bind_kv_cache(self.kv_caches)
        self.generator = torch.Generator(device=self.device).manual_seed(seed ^ 0x5EED)
        self.max_num_batched_tokens = max(1, max_num_batched_tokens)
        self.enable_caching = enable_caching
        self.valid_blocks: dict[int, bytes] = {}  # block id -> hash of the full block whose draft KV it holds
        self._states: dict[str, _DraftState] = {}
        self.last_step_s: float | None = None  # seconds per draft step of the last proposal, catch-up excluded
        self.num_forwards = 0  # draft forwards run (catch-up chunks + single-token steps)
        self.num_tokens_computed = 0  # tokens the draft has run (catch-up and drafts)
        self.num_nonfinite = 0  # draft rows with NaN/inf logits (their proposal stops there)
        self.num_reused_tokens = 0  # tokens of (re)starting requests whose draft KV came from valid_blocks
        # The draft's own fixed-size decode step (set by the worker in the target's decode mode): its single-token
        # forwards (draft steps, and catch-ups of one token: the target accepted every draft) then run padded /
        # compiled / replayed like the target's decode steps.
        self.decode_graphs: DecodeGraphs | None = None

    def lag(self, req: Request) -> int:
        """Tokens of ``req`` the draft has not run yet (its next catch-up), prefix-cache reuse not counted."""
        st = self._states.get(req.request_id)
        if st is None or st.req is not req or st.num_preemptions != req.num_preemptions:
            return req.num_tokens
        return req.num_tokens - st.num_computed

    # -- bookkeeping -------------------------------------------------------------------------------------
    def _state(self, req: Request, blocks: list[int]) -> _DraftState:
        st = self._states.get(req.request_id)
        if st is None or st.req is not req or st.num_preemptions != req.num_preemptions:
            valid = self._valid_prefix(req, blocks)
            st = _DraftState(req, req.num_preemptions, valid, num_recorded=valid // self.block_size)
            self._states[req.request_id] = st
            self.num_reused_tokens += st.num_computed
        return st

    def _valid_prefix(self, req: Request, blocks: list[int]) -> int:
        """Tokens at the start of a (re)starting request whose draft KV its blocks already hold."""
        if not self.enable_caching:
            return 0
        req.update_block_hashes(self.block_size)
        n = 0
        for b, h in zip(blocks, req.block_hashes):
            if self.valid_blocks.get(b) != h:
                break
            n += 1
        return n * self.block_size

    def _record_blocks(self, req: Request, st: _DraftState, blocks: list[int], first_written: int) -> None:
        """Enter the request's full blocks below ``st.num_computed`` in ``valid_blocks``: those completed since
        the last call and any this call wrote into (from position ``first_written``)."""
        if not self.enable_caching:
            return
        req.update_block_hashes(self.block_size)
        n_full = min(st.num_computed // self.block_size, len(req.block_hashes), len(blocks))
        for i in range(min(st.num_recorded, first_written // self.block_size), n_full):
            self.valid_blocks[blocks[i]] = req.block_hashes[i]
        st.num_recorded = max(st.num_recorded, n_full)

    def _prune(self) -> None:
        for rid in [rid for rid, st in self._states.items() if st.req.is_finished]:
            del self._states[rid]

    # -- proposing ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, reqs: list[Request], ks: list[int], block_ids: list[tuple[list[int], ...]]) -> list[Draft]:
        """``ks[i]`` draft tokens for ``reqs[i]`` (fewer only if the draft produced non-finite logits), given each
        one's block ids per KV cache group: with a draft model there is one group (no window block is freed,
        see :func:`fastinfer.worker.kv_cache.plan_kv_cache`)."""
        self._prune()
        if any(len(b) != 1 for b in block_ids):
            raise ValueError("the draft model shares the target's block tables: it needs one KV cache group")
        tables = [b[0] for b in block_ids]
        states = [self._state(r, b) for r, b in zip(reqs, tables)]
        ends = [r.num_tokens for r in reqs]  # T: draft 1 comes from the logits at position T - 1
        items: list[tuple[int, list[int], int]] = []  # (request index, tokens, first position)
        for i, (req, st) in enumerate(zip(reqs, states)):
            if st.pending:  # drafts the target accepted: their KV is the draft's KV of real tokens now
                known = req.all_token_ids[st.num_computed:st.num_computed + len(st.pending)]
                m = 0
                while m < len(known) and known[m] == st.pending[m]:
                    m += 1
                st.num_computed += m
                st.pending = []
            start = min(st.num_computed, ends[i] - 1)  # at least the last token: its logits give draft 1
            items.append((i, req.all_token_ids[start:ends[i]], start))
        hidden = self._catch_up(items, tables, ends)  # [B, hidden]
        t0 = time.perf_counter()
        for (i, _, start), req, st in zip(items, reqs, states):
            st.num_computed = ends[i]
            self._record_blocks(req, st, tables[i], start)
        tokens: list[list[int]] = [[] for _ in reqs]
        probs: list[list[torch.Tensor]] = [[] for _ in reqs]
        alive = list(range(len(reqs)))
        for step in range(max(ks)):
            logits = self.model.compute_logits(hidden)  # [len(alive), V] fp32
            tok, q = self._sample(logits, [reqs[i] for i in alive], step)
            finite_t = torch.isfinite(logits.sum(dim=-1))  # a NaN/inf anywhere in a row makes its sum one
            new, finite = torch.stack([tok, finite_t.to(tok.dtype)]).tolist()  # the draft step's one sync
            nxt = []
            for j, i in enumerate(alive):
                if not finite[j]:
                    self.num_nonfinite += 1
                    continue  # a broken draft proposes nothing more (verification stays exact regardless)
                tokens[i].append(new[j])
                qj = q[j]
                if qj is not None:
                    probs[i].append(qj)
                if len(tokens[i]) < ks[i]:
                    nxt.append(i)
            alive = nxt
            if not alive:
                break
            for i in alive:
                states[i].pending.append(tokens[i][-1])
            hidden = self._forward([(i, [tokens[i][-1]], ends[i] + step) for i in alive], tables)[1]
        # cost of one draft step without the catch-up (a new prompt or tokens decoded while drafting was off
        # would make drafting look dearer than it is); a single-step proposal has no forward to time
        self.last_step_s = (time.perf_counter() - t0) / max(ks) if max(ks) > 1 else None
        return [Draft(t, torch.stack(p) if p and len(p) == len(t) else None)  # [k, V]
                for t, p in zip(tokens, probs)]

    def _catch_up(self, items: list[tuple[int, list[int], int]], block_ids: list[list[int]], ends: list[int],
                  ) -> torch.Tensor:
        """Run every item's tokens (chunked to the token budget); the hidden state at each one's last token."""
        last: list[torch.Tensor | None] = [None] * len(items)
        queue = deque(items)
        while queue:
            batch: list[tuple[int, list[int], int]] = []
            room = self.max_num_batched_tokens
            while queue and room > 0:
                i, toks, pos = queue[0]
                take = min(len(toks), room)
                batch.append((i, toks[:take], pos))
                room -= take
                if take == len(toks):
                    queue.popleft()
                else:
                    queue[0] = (i, toks[take:], pos + take)
            rows, hidden = self._forward(batch, block_ids, last_only=False)
            for (i, toks, pos), row in zip(batch, rows):
                if pos + len(toks) == ends[i]:
                    last[i] = hidden[row]
        return torch.stack([h for h in last if h is not None])  # [B, hidden]

    def _forward(self, batch: list[tuple[int, list[int], int]], block_ids: list[list[int]],
                 last_only: bool = True) -> tuple[list[int], torch.Tensor]:
        """One packed forward of ``(request index, tokens, first position)`` chunks. Returns the row of each
        chunk's last token in the output and either all hidden states [T, hidden] or (``last_only``) just those
        rows [len(batch), hidden], in ``batch`` order."""
        for i, toks, pos in batch:
            self._drop_blocks(block_ids[i], pos, pos + len(toks))
        packed = pack_inputs([Chunk(list(toks), pos, block_ids[i]) for i, toks, pos in batch], self.block_size,
                             self.device)
        input_ids, rows = packed.input_ids, packed.last_rows
        graphs = self.decode_graphs
        if graphs is not None and graphs.supports(packed.meta):  # one token per request (drafts, or a catch-up
            hidden = graphs.run(packed.input_ids, packed.positions, packed.meta)  # of the bonus token): [B, hidden]
        else:
            hidden = self.model.forward(packed.input_ids, packed.positions, packed.meta)  # [T, hidden]
        self.num_forwards += 1
        self.num_tokens_computed += int(input_ids.numel())
        if last_only:
            return list(range(len(batch))), hidden[rows]  # [len(batch), hidden]
        return rows, hidden

    def _drop_blocks(self, blocks: list[int], start: int, end: int) -> None:
        """Writes at positions ``start..end-1`` change those blocks' draft KV: forget what they held."""
        if self.valid_blocks:
            for b in blocks[start // self.block_size:(end - 1) // self.block_size + 1]:
                self.valid_blocks.pop(b, None)

    def _sample(self, logits: torch.Tensor, reqs: list[Request], step: int,
                ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Draft token ``step`` of each row ([B] on the device): greedy argmax, or a sample from the filtered
        distribution q (same temperature / top-k / top-p / min-p as the target's), returned with q [V] for
        verification."""
        tokens, probs = draft_sample(logits, reqs, step, self.generator)
        q: list[torch.Tensor | None] = [None] * len(reqs)
        if probs is not None:
            for j, r in enumerate(reqs):
                if not r.sampling_params.greedy:
                    q[j] = probs[j]
        return tokens, q
