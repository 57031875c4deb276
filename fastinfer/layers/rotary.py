"""Rotary position embeddings: inverse frequencies (default, linear, llama3, longrope scaling), partial rotary
(only the first ``rotary_dim`` features of each head rotate) and the cos/sin cache."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fastinfer.config import ModelConfig
from fastinfer.ops import OpSet


def inv_frequencies(rot_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """[rot_dim / 2] fp32 inverse frequencies, as HF transformers computes them."""
    inv = 1.0 / (theta ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in ("default", None):
        return inv
    assert scaling is not None
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / lo, old_ctx / hi
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope scaling type {kind!r} (supported: default, linear, llama3, longrope)")


def _longrope_cache(rot_dim: int, max_position: int, theta: float, scaling: dict[str, Any]) -> torch.Tensor:
    """LongRoPE (Phi-3 "longrope" / "su"): per-frequency factors, ``short_factor`` for positions below
    ``original_max_position_embeddings`` and ``long_factor`` from there on, cos and sin scaled by the attention
    factor. HF switches every position of a sequence to the long factors once it grows past the original length
    (recomputing its cache); a paged cache keeps what it wrote, so positions keep their own factors (as vLLM)."""
    orig = scaling.get("original_max_position_embeddings")
    if not isinstance(orig, int) or orig < 1:
        raise ValueError("longrope scaling needs original_max_position_embeddings (a positive integer)")
    factor = scaling.get("factor") or max_position / orig
    attn = scaling.get("attention_factor")
    if attn is None:
        attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    exponents = torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim
    pos = torch.arange(max_position, dtype=torch.float32)
    parts = []
    for key, rows in (("short_factor", pos[:orig]), ("long_factor", pos[orig:])):
        ext = torch.tensor(scaling[key], dtype=torch.float32)
        if ext.shape != (rot_dim // 2,):
            raise ValueError(f"longrope {key} must have {rot_dim // 2} entries, got {tuple(ext.shape)}")
        parts.append(torch.outer(rows, 1.0 / (ext * theta ** exponents)))
    freqs = torch.cat(parts)  # [P, rot/2]
    return torch.cat([freqs.cos() * attn, freqs.sin() * attn], dim=-1)


def cos_sin_cache(rot_dim: int, max_position: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """[max_position, rot_dim] fp32: cos of every position's angles in the first half, sin in the second."""
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in ("longrope", "su"):
        assert scaling is not None
        return _longrope_cache(rot_dim, max_position, theta, scaling)
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_frequencies(rot_dim, theta, scaling))
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


class RotaryEmbedding(nn.Module):
    """NeoX-style RoPE on the first ``rotary_dim`` features of each head (default: all ``head_dim``)."""

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict[str, Any] | None,
                 ops: OpSet, rotary_dim: int | None = None) -> None:
        super().__init__()
        self.ops = ops
        rot = head_dim if rotary_dim is None else rotary_dim
        if not 0 < rot <= head_dim or rot % 2:
            raise ValueError(f"rotary_dim must be even and in (0, head_dim={head_dim}], got {rot}")
        self.register_buffer("cos_sin_cache", cos_sin_cache(rot, max_position, theta, scaling), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ops.rotary_embedding(positions, q, k, self.cos_sin_cache)


def rotary_from_config(cfg: ModelConfig, ops: OpSet, head_dim: int | None = None) -> RotaryEmbedding:
    """The RoPE an HF config describes: ``rope_theta``, ``rope_scaling`` (a top-level
    ``original_max_position_embeddings`` fills in a scaling dict that lacks it, as in Phi-3 configs) and partial
    rotary from ``partial_rotary_factor`` (top level or in ``rope_parameters``) or GPT-NeoX's ``rotary_pct``."""
    hf = cfg.hf_config
    head_dim = head_dim or cfg.head_dim
    params = hf.get("rope_parameters")
    params = params if isinstance(params, dict) else {}
    factor = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct", 1.0)))
    scaling = cfg.rope_scaling
    if scaling is not None and "original_max_position_embeddings" not in scaling \
            and "original_max_position_embeddings" in hf:
        scaling = {**scaling, "original_max_position_embeddings": hf["original_max_position_embeddings"]}
    return RotaryEmbedding(head_dim, cfg.max_position_embeddings, cfg.rope_theta, scaling, ops,
                           rotary_dim=int(head_dim * factor))
