"""Mixture of Experts: the top-k router and the sparse MoE block (routed SwiGLU experts through the op set's
``fused_moe``, plus Qwen2-MoE's optional shared expert behind a sigmoid gate).

Experts are stored stacked, the layout ``fused_moe`` reads: ``w13`` [E, 2I, H] (each expert's gate rows, then its
up rows) and ``w2`` [E, H, I]. Checkpoints give them per expert (``experts.{e}.w1/w3/w2`` in Mixtral,
``experts.{e}.gate_proj/up_proj/down_proj`` in Qwen-MoE and OLMoE) or, as transformers 5 holds them, already
stacked (``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj`` [E, H, I]); :func:`expert_checkpoint_name`
recognises both. Experts are plain parameters, not :class:`Linear` layers, so weight quantization leaves them
float (quantized experts are a later step); the router and the shared-expert gate stay float too.
"""
from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastinfer.layers.mlp import GatedMLP
from fastinfer.ops import OpSet

# checkpoint expert tensor -> (our w13 / w2 parameter, expert id or None for a stacked tensor, shard in w13)
_PER_EXPERT = re.compile(r"^(?P<mod>.*\.experts)\.(?P<e>\d+)\.(?P<kind>w1|w3|w2|gate_proj|up_proj|down_proj)\.weight$")
_STACKED = re.compile(r"^(?P<mod>.*\.experts)\.(?P<kind>gate_up_proj|down_proj)(\.weight)?$")
_KIND = {"w1": ("w13", 0), "gate_proj": ("w13", 0), "w3": ("w13", 1), "up_proj": ("w13", 1),
         "w2": ("w2", None), "down_proj": ("w2", None), "gate_up_proj": ("w13", None)}


def expert_checkpoint_name(name: str) -> tuple[str, str, int | None, int | None] | None:
    """``(experts module, "w13" | "w2", expert id (None: all experts stacked), w13 half (0 gate, 1 up; None:
    both or w2))`` for a checkpoint expert tensor ``name``, else None."""
    m = _PER_EXPERT.match(name)
    if m is not None:
        param, half = _KIND[m["kind"]]
        return m["mod"], param, int(m["e"]), half
    m = _STACKED.match(name)
    if m is not None:
        return m["mod"], "w13" if m["kind"] == "gate_up_proj" else "w2", None, None
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


class FusedExperts(nn.Module):
    """``num_experts`` SwiGLU experts stacked: ``w13`` [E, 2I, H], ``w2`` [E, H, I]. ``load`` takes checkpoint
    tensors per expert or stacked and says when both parameters are complete."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, dtype=dtype),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, dtype=dtype),
                               requires_grad=False)
        self._seen: dict[str, set[tuple[int, int]]] = {"w13": set(), "w2": set()}

    def _parts(self, param: str) -> set[tuple[int, int]]:
        return {(e, h) for e in range(self.num_experts) for h in ((0, 1) if param == "w13" else (0,))}

    def load(self, param: str, expert: int | None, half: int | None, tensor: Any) -> bool:
        """Copy one checkpoint tensor into ``param`` ("w13" / "w2"): expert ``expert``'s gate (half 0), up (half
        1) or down rows, or every expert at once (``expert`` None). True when ``param`` is complete."""
        p: nn.Parameter = getattr(self, param)
        inter = self.intermediate_size
        if expert is None:
            target, parts = p.data, self._parts(param)
        elif not 0 <= expert < self.num_experts:
            raise ValueError(f"checkpoint has expert {expert}, the model has {self.num_experts} experts")
        else:
            target = p.data[expert] if half is None else p.data[expert, half * inter:(half + 1) * inter]
            parts = {(expert, half or 0)}
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(f"shape mismatch for expert tensor ({param}, expert {expert}, half {half}): checkpoint "
                             f"{tuple(tensor.shape)}, model expects {tuple(target.shape)}")
        target.copy_(tensor)
        self._seen[param] |= parts
        return self._seen[param] == self._parts(param)


class SparseMoeBlock(nn.Module):
    """``fused_moe(x, experts, router(x))`` plus, when ``shared_intermediate_size`` is given (Qwen2-MoE),
    ``sigmoid(x @ shared_expert_gate.T) * shared_expert(x)``."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, renormalize: bool,
                 ops: OpSet, dtype: torch.dtype, shared_intermediate_size: int | None = None) -> None:
        super().__init__()
        self.ops = ops
        self.gate = TopKRouter(hidden_size, num_experts, top_k, renormalize, dtype)
        self.experts = FusedExperts(num_experts, hidden_size, intermediate_size, dtype)
        self.shared_expert: GatedMLP | None = None
        self.shared_expert_gate: nn.Parameter | None = None
        if shared_intermediate_size:
            self.shared_expert = GatedMLP(hidden_size, shared_intermediate_size, ops, dtype)
            self.shared_expert_gate = nn.Parameter(torch.empty(1, hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        out = self.ops.fused_moe(x, self.experts.w13, self.experts.w2, weights, ids)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            out = out + torch.sigmoid(F.linear(x, self.shared_expert_gate)) * self.shared_expert(x)
        return out
