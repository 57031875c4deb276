"""Mixture of Experts: the top-k router and the sparse MoE block (routed SwiGLU experts through the op set's
``fused_moe``, plus Qwen2-MoE's optional shared expert behind a sigmoid gate).

Experts are stored stacked, the layout ``fused_moe`` reads: ``w13`` [E, 2I, H] (each expert's gate rows, then its
up rows) and ``w2`` [E, H, I]. Checkpoints give them per expert (``experts.{e}.w1/w3/w2`` in Mixtral,
``experts.{e}.gate_proj/up_proj/down_proj`` in Qwen-MoE and OLMoE) or, as transformers 5 holds them, already
stacked (``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj`` [E, H, I]; ours saved: ``experts.w13.weight``);
:func:`expert_checkpoint_name` recognises all of them. Each projection is a :class:`StackedWeight`: float, or int8 /
int4 weight-only after ``quantize`` (a method's ``quantize_experts``) or when the checkpoint holds quantized experts
(a GGUF file's stacked ``ffn_*_exps``, a directory saved by ``fastinfer quantize``); ``fused_moe`` reads either.
The router and the shared-expert gate stay float.

Tensor parallelism: every rank routes identically (the router is replicated) and holds its slice of each expert's
intermediate size: rows ``[r I/N, (r+1) I/N)`` of both the gate and the up half of ``w13`` and the same columns of
``w2`` (quantized ``w2`` on group boundaries); ``fused_moe`` runs on the slice and the block's output (the shared
expert's, split like a dense MLP, included) is all-reduced once.
"""
from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastinfer.distributed.communication import all_reduce
from fastinfer.distributed.parallel_state import tp_rank, tp_size
from fastinfer.distributed.sharding import check_group_split, divide, materialize, narrow, row_group_size
from fastinfer.layers.mlp import GatedMLP
from fastinfer.ops import OpSet
from fastinfer.quantization.format import QuantizedExperts, QuantizedWeight
from fastinfer.quantization.methods import QuantMethod

# checkpoint expert tensor -> (our w13 / w2 parameter, expert id or None for a stacked tensor, shard in w13)
_PER_EXPERT = re.compile(r"^(?P<mod>.*\.experts)\.(?P<e>\d+)\.(?P<kind>w1|w3|w2|gate_proj|up_proj|down_proj)\.weight$")
_STACKED = re.compile(r"^(?P<mod>.*\.experts)\.(?P<kind>gate_up_proj|gate_proj|up_proj|down_proj|w13|w2)"
                      r"(\.weight)?$")
_KIND = {"w1": ("w13", 0), "gate_proj": ("w13", 0), "w3": ("w13", 1), "up_proj": ("w13", 1),
         "w2": ("w2", None), "down_proj": ("w2", None), "gate_up_proj": ("w13", None), "w13": ("w13", None)}


def expert_checkpoint_name(name: str) -> tuple[str, str, int | None, int | None] | None:
    """``(experts module, "w13" | "w2", expert id (None: all experts stacked), w13 half (0 gate, 1 up; None:
    both or w2))`` for a checkpoint expert tensor ``name``, else None."""
    m = _PER_EXPERT.match(name)
    if m is not None:
        param, half = _KIND[m["kind"]]
        return m["mod"], param, int(m["e"]), half
    m = _STACKED.match(name)
    if m is not None:
        param, half = _KIND[m["kind"]]
        return m["mod"], param, None, half
    return None


class TopKRouter(nn.Module):
    """Router logits in fp32 (``x @ weight.T``, weight [E, H]), softmax over all experts, the top ``k`` (ties as
    ``torch.topk``), renormalised to sum 1 when ``renormalize`` (Mixtral always; Qwen-MoE / OLMoE:
    ``norm_topk_prob``) -- HF's order of operations. (HF computes the logits in the model dtype and, for Qwen /
    OLMoE, rounds the weights back to it; identical in fp32.) Returns (weights [T, k] fp32, ids [T, k] int64)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, renormalize: bool, dtype: torch.dtype) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"MoE router: top_k ({top_k}) must be between 1 and num_experts ({num_experts})")
        self.top_k, self.renormalize = top_k, renormalize
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.linear(x.float(), self.weight.float()).softmax(dim=-1)  # [T, E]
        weights, ids = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids


class StackedWeight(nn.Module):
    """One expert projection of ``E`` experts, [E, N, K]: a float ``weight`` parameter, or once quantized
    (:meth:`set_quantized`) a :class:`~fastinfer.quantization.format.QuantizedExperts` kept as the buffers
    ``qweight``, ``scales`` and ``mins`` (so ``state_dict`` saves them, as for a quantized :class:`Linear`)."""

    def __init__(self, num_experts: int, out_features: int, in_features: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.shape = (num_experts, out_features, in_features)
        self.weight: nn.Parameter | None = nn.Parameter(torch.empty(*self.shape, dtype=dtype), requires_grad=False)
        self.device = self.weight.device  # where quantized tensors go (the serving device)
        self.quant: QuantizedExperts | None = None

    def set_quantized(self, q: QuantizedExperts) -> None:
        if q.shape != self.shape:
            raise ValueError(f"quantized experts have shape {q.shape}, the layer is {self.shape}")
        q = q.to(self.device)
        self.quant, self.weight = q, None
        for name, t in q.tensors().items():
            self.register_buffer(name, t)

    def kernel_args(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(weights or codes, scales, mins) as ``fused_moe`` takes them."""
        if self.quant is None:
            assert self.weight is not None
            return self.weight, None, None
        return self.quant.qweight, self.quant.scales, self.quant.mins

    def extra_repr(self) -> str:
        q = self.quant
        kind = "dense" if q is None else f"int{q.bits} g{q.group_size}"
        return f"experts={self.shape[0]}, out={self.shape[1]}, in={self.shape[2]}, {kind}"


class FusedExperts(nn.Module):
    """``num_experts`` SwiGLU experts stacked: ``w13`` [E, 2I, H], ``w2`` [E, H, I] (:class:`StackedWeight`s,
    float or weight-only quantized, each on its own). ``load`` takes checkpoint tensors per expert or stacked,
    float or quantized, and says when both projections are complete. Under tensor parallelism
    ``intermediate_size`` is this rank's slice of ``full_intermediate_size`` (the checkpoint's), which ``load``
    narrows each tensor to."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.full_intermediate_size = intermediate_size
        intermediate_size = divide(intermediate_size, self.tp_size, "moe intermediate_size")
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.w13 = StackedWeight(num_experts, 2 * intermediate_size, hidden_size, dtype)
        self.w2 = StackedWeight(num_experts, hidden_size, intermediate_size, dtype)
        self._seen: dict[str, set[tuple[int, int]]] = {"w13": set(), "w2": set()}
        self._pending: dict[str, dict[tuple[int, int], QuantizedWeight]] = {"w13": {}, "w2": {}}

    def _parts(self, param: str) -> set[tuple[int, int]]:
        return {(e, h) for e in range(self.num_experts) for h in ((0, 1) if param == "w13" else (0,))}

    def load(self, param: str, expert: int | None, half: int | None,
             tensor: torch.Tensor | QuantizedWeight | QuantizedExperts) -> bool:
        """Copy one checkpoint tensor into ``param`` ("w13" / "w2"): expert ``expert``'s gate (half 0), up (half
        1) or down rows, or every expert at once (``expert`` None). Quantized tensors (one expert's, or stacked)
        are collected until the projection is complete, then stacked into its quantized format. True when
        ``param`` is complete."""
        if expert is not None and not 0 <= expert < self.num_experts:
            raise ValueError(f"checkpoint has expert {expert}, the model has {self.num_experts} experts")
        if self.tp_size > 1:
            if param == "w13" and half is None:  # both halves stacked: each narrowed to this rank's rows
                full = self.full_intermediate_size
                self.load(param, expert, 0, _narrow_experts(tensor, 0, 0, full))
                return self.load(param, expert, 1, _narrow_experts(tensor, 0, full, full))
            tensor = self._rank_slice(param, tensor)
        experts = range(self.num_experts) if expert is None else (expert,)
        halves = (0, 1) if param == "w13" and half is None else (half or 0,)
        parts = {(e, h) for e in experts for h in halves}
        if isinstance(tensor, (QuantizedWeight, QuantizedExperts)):
            self._load_quantized(param, expert, half, tensor, parts)
        else:
            self._load_float(param, expert, half, tensor)
        self._seen[param] |= parts
        done = self._seen[param] == self._parts(param)
        if done and self._pending[param]:
            self._finish_quantized(param)
        return done

    def _rank_slice(self, param: str, tensor: Any) -> Any:
        """This rank's rows of a w13 half or columns of w2 (quantized: on group boundaries)."""
        dim = 0 if param == "w13" else 1
        full, size = self.full_intermediate_size, self.intermediate_size
        got = tensor.shape[dim - 2]
        if got != full:
            raise ValueError(f"shape mismatch for expert tensor {param}: checkpoint {tuple(tensor.shape)}, the "
                             f"tensor-parallel experts expect {full} along the intermediate dimension")
        if dim == 1 and isinstance(tensor, (QuantizedWeight, QuantizedExperts)):
            check_group_split(full, size, tensor.group_size, self.tp_size)
        return _narrow_experts(tensor, dim, self.tp_rank * size, size)

    def _load_float(self, param: str, expert: int | None, half: int | None, tensor: torch.Tensor) -> None:
        w: StackedWeight = getattr(self, param)
        if w.weight is None or self._pending[param]:
            raise ValueError(f"expert {param}: a float checkpoint tensor beside quantized ones")
        inter = self.intermediate_size
        target = w.weight.data if expert is None else w.weight.data[expert]
        if half is not None:
            target = target.narrow(-2, half * inter, inter)
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(f"shape mismatch for expert tensor ({param}, expert {expert}, half {half}): checkpoint "
                             f"{tuple(tensor.shape)}, model expects {tuple(target.shape)}")
        target.copy_(tensor)

    def _load_quantized(self, param: str, expert: int | None, half: int | None,
                        tensor: QuantizedWeight | QuantizedExperts, parts: set[tuple[int, int]]) -> None:
        if self._seen[param] - set(self._pending[param]):
            raise ValueError(f"expert {param}: a quantized checkpoint tensor beside float ones")
        n, k = getattr(self, param).shape[1:]
        rows = n // 2 if param == "w13" and half is not None else n
        if isinstance(tensor, QuantizedExperts):
            if expert is not None or tensor.shape != (self.num_experts, rows, k):
                raise ValueError(f"shape mismatch for stacked quantized experts ({param}, half {half}): checkpoint "
                                 f"{tensor.shape}, model expects {(self.num_experts, rows, k)}")
            per_expert = {e: tensor.expert(e) for e in range(self.num_experts)}
        else:
            if expert is None or tensor.shape != (rows, k):
                raise ValueError(f"shape mismatch for quantized expert tensor ({param}, expert {expert}, half "
                                 f"{half}): checkpoint {tensor.shape}, model expects {(rows, k)}")
            per_expert = {expert: tensor}
        for e, qw in per_expert.items():
            self._pending[param][(e, 0 if half is None else half)] = qw

    def _finish_quantized(self, param: str) -> None:
        from fastinfer.layers.linear import concat_rows

        pending, self._pending[param] = self._pending[param], {}
        halves = sorted({h for _, h in pending})
        stacked = [concat_rows([pending[(e, h)] for h in halves]) for e in range(self.num_experts)]
        getattr(self, param).set_quantized(QuantizedExperts.stack(stacked))

    def quantize(self, method: QuantMethod, group_size: int | None = None) -> bool:
        """Quantize both float projections with ``method`` (per expert, stacked); False when the method leaves
        float weights float."""
        done = False
        for w in (self.w13, self.w2):
            if w.weight is None:
                continue
            g = group_size
            if w is self.w2 and self.tp_size > 1:  # one process's groups along the whole K
                g = row_group_size(method, self.full_intermediate_size, self.intermediate_size, self.tp_size, g)
            q = method.quantize_experts(w.weight.data, g)
            if q is not None:
                w.set_quantized(q)
                done = True
        return done

    @property
    def quantized(self) -> bool:
        return self.w13.quant is not None or self.w2.quant is not None

    def forward(self, ops: OpSet, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """The experts' output; under tensor parallelism this rank's partial sum (the block all-reduces)."""
        w13, s13, m13 = self.w13.kernel_args()
        w2, s2, m2 = self.w2.kernel_args()
        if s13 is None and s2 is None:
            return ops.fused_moe(x, w13, w2, topk_weights, topk_ids)
        return ops.fused_moe(x, w13, w2, topk_weights, topk_ids, s13, m13, s2, m2)


def _narrow_experts(t: Any, dim: int, start: int, size: int) -> Any:
    """Rows (``dim`` 0) or columns (``dim`` 1) of each expert's [N, K] in a float tensor ([N, K] or [E, N, K],
    possibly a lazy checkpoint slice: read here), a :class:`QuantizedWeight` or :class:`QuantizedExperts`."""
    if isinstance(t, QuantizedExperts):
        return QuantizedExperts.stack([narrow(t.expert(e), dim, start, size) for e in range(t.num_experts)])
    if isinstance(t, QuantizedWeight):
        return narrow(t, dim, start, size)
    return materialize(narrow(t, dim - 2, start, size))


class SparseMoeBlock(nn.Module):
    """``fused_moe(x, experts, router(x))`` plus, when ``shared_intermediate_size`` is given (Qwen2-MoE),
    ``sigmoid(x @ shared_expert_gate.T) * shared_expert(x)``.

    ``expert_tokens`` [E] int64 counts the (token, expert) assignments routed so far, on the device, without a
    host read (one static-shape ``index_add_`` per call): the routing balance that
    :meth:`fastinfer.worker.worker.Worker.expert_load` reports and the server exports."""

    expert_tokens: torch.Tensor

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, renormalize: bool,
                 ops: OpSet, dtype: torch.dtype, shared_intermediate_size: int | None = None) -> None:
        super().__init__()
        self.ops = ops
        self.gate = TopKRouter(hidden_size, num_experts, top_k, renormalize, dtype)
        self.register_buffer("expert_tokens", torch.zeros(num_experts, dtype=torch.int64), persistent=False)
        self.experts = FusedExperts(num_experts, hidden_size, intermediate_size, dtype)
        self.shared_expert: GatedMLP | None = None
        self.shared_expert_gate: nn.Parameter | None = None
        if shared_intermediate_size:
            self.shared_expert = GatedMLP(hidden_size, shared_intermediate_size, ops, dtype, reduce=False)
            self.shared_expert_gate = nn.Parameter(torch.empty(1, hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        flat = ids.reshape(-1)
        self.expert_tokens.index_add_(0, flat, torch.ones_like(flat))
        out = self.experts(self.ops, x, weights, ids)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            out = out + torch.sigmoid(F.linear(x, self.shared_expert_gate)) * self.shared_expert(x)
        return all_reduce(out)  # the ranks' partial sums (no call without tensor parallelism)
