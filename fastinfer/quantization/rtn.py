"""Data-free round-to-nearest (RTN) quantizers into the format of :mod:`fastinfer.quantization.format`: int8
symmetric per output channel (or per group), int4 asymmetric per group (min/max range with a small clipping
search)."""
from __future__ import annotations

import torch

from fastinfer.quantization.format import QuantizedWeight, pack_int4


def quantize_int8(w: torch.Tensor, group_size: int | None = None) -> QuantizedWeight:
    """Symmetric RTN int8 of a float [N, K] weight: per output channel (``group_size`` None) or per group."""
    n, k = w.shape
    g = k if group_size is None else group_size
    if k % g:
        raise ValueError(f"group_size {g} does not divide K={k}")
    wf = w.float().view(n, k // g, g)  # [N, G, g]
    amax = wf.abs().amax(-1)  # [N, G]
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(wf / scales.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return QuantizedWeight(8, g, q.view(n, k), scales, None)


def quantize_int4(w: torch.Tensor, group_size: int = 128, search: bool = True) -> QuantizedWeight:
    """Asymmetric int4 of a float [N, K] weight, one (scale, min) per ``group_size`` inputs: ``w ~ q * scale +
    min`` with q in 0..15 (the zero point is ``-min / scale``, not rounded, as in GGUF Q4_1).

    Round-to-nearest on the group's [min, max] range; with ``search`` the range is also shrunk by a few factors
    (clipping outliers) and each group keeps the candidate with the least squared error. Still data-free."""
    n, k = w.shape
    if k % group_size or group_size % 2:
        raise ValueError(f"group_size {group_size} does not divide K={k} (or is odd)")
    wf = w.float().view(n, k // group_size, group_size)  # [N, G, g]
    lo0, hi0 = wf.amin(-1), wf.amax(-1)  # [N, G]
    mid = (hi0 + lo0) / 2

    def candidate(shrink: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        lo = mid + (lo0 - mid) * shrink
        scales = ((mid + (hi0 - mid) * shrink) - lo) / 15.0
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # [N, G]
        q = torch.round((wf - lo.unsqueeze(-1)) / scales.unsqueeze(-1)).clamp_(0, 15)  # [N, G, g]
        err = (q * scales.unsqueeze(-1) + lo.unsqueeze(-1) - wf).pow(2).sum(-1)  # [N, G]
        return err, q, scales, lo

    best_err, best_q, best_s, best_m = candidate(1.0)
    for shrink in ((0.95, 0.9, 0.85, 0.8) if search else ()):
        err, q, scales, lo = candidate(shrink)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_q = torch.where(better.unsqueeze(-1), q, best_q)
        best_s = torch.where(better, scales, best_s)
        best_m = torch.where(better, lo, best_m)
    return QuantizedWeight(4, group_size, pack_int4(best_q.view(n, k)), best_s, best_m)


def fit_group_size(k: int, group_size: int) -> int:
    """``group_size`` when it divides ``k``, else the largest of 64 / 32 below it that does (e.g. SmolLM2's
    hidden size 576 = 4.5 x 128 takes group 64); raises when none does."""
    for g in (group_size,) + tuple(x for x in (64, 32) if x < group_size):
        if k % g == 0:
            return g
    raise ValueError(f"no int4 group size <= {group_size} divides K={k} (needs a multiple of 32)")


def quantize(w: torch.Tensor, method: str, group_size: int | None = None) -> QuantizedWeight:
    """``method`` "int8" (per channel unless ``group_size``) or "int4" (group 128 unless ``group_size``; a
    smaller group when it does not divide K, see :func:`fit_group_size`)."""
    if method == "int8":
        return quantize_int8(w, group_size)
    if method == "int4":
        return quantize_int4(w, fit_group_size(w.shape[1], group_size or 128))
    raise ValueError(f"unknown RTN quantization {method!r}; choose int8 or int4")
