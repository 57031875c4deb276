"""The decode step at fixed batch sizes: CUDA graphs on a GPU, ``torch.compile`` on request, and the same padded
path run eagerly (``static``, to test it anywhere).

A step whose every sequence decodes one token (no prefill chunk, no drafts to verify) and whose batch fits the
largest rung of a ladder of batch sizes runs on persistent input buffers: the step's token ids, positions, slots,
sequence lengths and block table are copied into them, the rows past the batch up to the next rung are padding
(slot -1: their keys and values are never stored; length 1: they read one cached slot and their output is
dropped), and the rung's captured graph is replayed (or its compiled forward called). Every op of the forward
reads lengths from device tensors only; the host-side maxima the Triton decode kernel sizes its grid with are
those of ``max_model_len`` (the split-KV kernel skips the splits past a row's length), so one capture per rung
serves every step. Prefill, chunked prefill, verification steps and batches past the ladder run eagerly.
Sampling stays outside the captured region (it has per-request host decisions); nothing inside it syncs with
the host.
"""
from __future__ import annotations

import logging
import time
import types
from collections.abc import Sequence
from typing import Any

import torch

from fastinfer.models.interface import CausalLM
from fastinfer.ops import AttentionMetadata

logger = logging.getLogger("fastinfer")

DEFAULT_LADDER = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def capture_sizes(max_num_seqs: int, sizes: Sequence[int] | None = None) -> list[int]:
    """The ladder of batch sizes: ``sizes`` (vLLM's ``cudagraph_capture_sizes``) or the default ladder, capped at
    ``max_num_seqs``, which is always the top rung."""
    base = sorted(set(sizes)) if sizes else [b for b in DEFAULT_LADDER if b < max_num_seqs] + [max_num_seqs]
    if any(not isinstance(b, int) or b < 1 for b in base):
        raise ValueError(f"cudagraph_capture_sizes must be positive integers, got {sizes}")
    return [b for b in base if b <= max_num_seqs] or [max_num_seqs]


def _room_for_recompiles(n: int) -> Any:
    """Make room for ``n`` more compiled entries of one forward and fail, not fall back, while they compile.

    Every rung is one more compiled entry of the same code object (``forward`` of the model class), and so is every
    other engine's (a draft of the same class, earlier engines in the process). Past dynamo's ``recompile_limit``
    (8) a new shape silently runs eagerly: with the default ladder that was batch 1, the last rung compiled. The
    limits grow by ``n`` per capture, and inside the capture a hit raises."""
    cfg = torch._dynamo.config
    cfg.recompile_limit += n
    cfg.accumulated_recompile_limit += n
    fail: dict[str, Any] = {"fail_on_recompile_limit_hit": True} if hasattr(cfg, "fail_on_recompile_limit_hit") else {}
    return cfg.patch(fail)


def _own_forward(model: CausalLM) -> Any:
    """``model.forward`` bound to a copy of its code object. Dynamo keeps compiled entries per code object and tells
    them apart by guards; the compiled steps drop the guards on the model's modules and weights (they never change
    after load; checking some 500 tensors of SmolLM2 cost 1.5 ms of a 10 ms int4 step on a 2-core AVX2 CPU), and
    without them a draft of the same class, or another engine's model, would match this model's entries. A code
    object of its own gives each captured model its own entries. Rebinding a captured model's weights or KV cache
    would need a new capture (nothing does: both are bound before :meth:`DecodeGraphs.capture`)."""
    fn = type(model).forward
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    return types.MethodType(own, model)


class DecodeGraphs:
    """Decode steps of ``model`` at the batch sizes ``rungs`` in ``mode`` ("cuda_graph", "compile" or "static");
    :meth:`capture` once after the KV cache is bound, then :meth:`run` for the steps :meth:`supports`."""

    def __init__(self, model: CausalLM, device: torch.device, mode: str, rungs: Sequence[int], max_model_len: int,
                 block_size: int, name: str = "decode step", inductor_options: dict[str, Any] | None = None) -> None:
        if mode not in ("cuda_graph", "compile", "static"):
            raise ValueError(f"DecodeGraphs mode must be cuda_graph, compile or static, got {mode!r}")
        if mode == "cuda_graph" and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.model, self.device, self.mode, self.name = model, device, mode, name
        self.inductor_options = dict(inductor_options or {})
        self.rungs = sorted(rungs)
        self.max_model_len = max_model_len
        top, width = self.rungs[-1], -(-max_model_len // block_size)
        self.input_ids = torch.zeros(top, dtype=torch.int64, device=device)
        self.positions = torch.zeros(top, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((top,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(top, dtype=torch.int32, device=device)
        self.block_table = torch.zeros(top, width, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(top + 1, dtype=torch.int32, device=device)
        self.metas = {b: self._meta(b) for b in self.rungs}
        self.outputs: dict[int, torch.Tensor] = {}
        self.graphs: dict[int, Any] = {}
        self.forward: Any = model.forward
        self.num_runs = 0  # steps served (for tests and logs)
        self.capture_s = 0.0

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc.narrow(0, 0, b + 1), seq_lens=self.seq_lens.narrow(0, 0, b),
            block_table=self.block_table.narrow(0, 0, b), slot_mapping=self.slot_mapping.narrow(0, 0, b),
            query_lens_cpu=[1] * b, seq_lens_cpu=[self.max_model_len] * b, num_decodes=b,
            input_ids=self.input_ids.narrow(0, 0, b), positions=self.positions.narrow(0, 0, b))

    def _inputs(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.input_ids.narrow(0, 0, b), self.positions.narrow(0, 0, b)

    def supports(self, meta: AttentionMetadata) -> bool:
        """A pure decode step (one token per sequence, one KV cache group) that fits the top rung."""
        b = meta.num_seqs
        return (0 < b <= self.rungs[-1] and meta.num_decodes == b and meta.slot_mapping.shape[0] == b
                and meta.kv_groups is None and meta.block_table.shape[1] <= self.block_table.shape[1])

    def rung(self, b: int) -> int:
        return next(r for r in self.rungs if r >= b)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture (cuda_graph) or compile (compile) every rung, largest first, on padding-only inputs (slot -1:
        the KV cache is never written). Logs the time taken."""
        t0 = time.perf_counter()
        if self.mode == "cuda_graph":
            pool = torch.cuda.graph_pool_handle()
            stream = torch.cuda.Stream(self.device)
            torch.cuda.synchronize(self.device)
            for b in reversed(self.rungs):
                meta = self.metas[b]
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):
                    for _ in range(2):  # warm-up: Triton compiles and autotunes outside the capture
                        self.model.forward(*self._inputs(b), meta)
                torch.cuda.current_stream(self.device).wait_stream(stream)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    self.outputs[b] = self.model.forward(*self._inputs(b), meta)
                self.graphs[b] = g
            torch.cuda.synchronize(self.device)
        elif self.mode == "compile":
            # no guards on the weights; the model's own code object keeps its entries apart (_own_forward)
            opts = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe, **self.inductor_options}
            self.forward = torch.compile(_own_forward(self.model), dynamic=False, options=opts)
            with _room_for_recompiles(len(self.rungs)):
                for b in reversed(self.rungs):
                    self.forward(*self._inputs(b), self.metas[b])
        self.capture_s = time.perf_counter() - t0
        logger.info("%s: %s for batch sizes %s (%.1f s)", self.name, {"cuda_graph": "CUDA graphs captured",
                    "compile": "torch.compile", "static": "padded static buffers"}[self.mode], self.rungs,
                    self.capture_s)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [B, hidden] of a supported step: inputs into the buffers, padding rows reset, the rung's
        graph replayed (or its forward run). The result is a view of a persistent buffer in cuda_graph mode:
        valid until the next step."""
        b = meta.num_seqs
        r = self.rung(b)
        w = meta.block_table.shape[1]
        self.input_ids[:b].copy_(input_ids)
        self.positions[:b].copy_(positions)
        self.slot_mapping[:b].copy_(meta.slot_mapping)
        self.seq_lens[:b].copy_(meta.seq_lens)
        self.block_table[:b, :w].copy_(meta.block_table)
        if r > b:  # padding rows: nothing stored, one slot read, output dropped
            self.slot_mapping[b:r].fill_(-1)
            self.seq_lens[b:r].fill_(1)
            self.input_ids[b:r].zero_()
            self.positions[b:r].zero_()
        self.num_runs += 1
        m = self.metas[r]
        if self.mode == "cuda_graph":
            self.graphs[r].replay()
            return self.outputs[r].narrow(0, 0, b)
        return self.forward(*self._inputs(r), m).narrow(0, 0, b)
