"""Weight-only quantization formats: W8A16 (int8) and W4A16 (int4), both group-wise.

One format for every backend (the kernels read it as is), described by :class:`QuantizedWeight`:

- ``bits=8``: ``qweight`` int8 [N, K], values -127..127 (GGUF Q8_0 may also hold -128), ``mins`` is None.
  ``group_size == K`` is per-output-channel (our ``quantization="int8"``); 32 is GGUF Q8_0.
- ``bits=4``: ``qweight`` uint8 [N, K // 2]; byte ``(n, j)`` holds ``q[n, 2j]`` in its low nibble and
  ``q[n, 2j + 1]`` in its high nibble, values 0..15.
- ``scales`` and ``mins`` are [N, K // group_size], float32 or float16 (GGUF's own f16 ``d``/``m`` are kept
  as they are, so the import is lossless). The weight is

      w[n, k] = q[n, k] * scales[n, g] + mins[n, g]      (g = k // group_size; + 0 when mins is None)

  computed in fp32. An asymmetric zero point ``z`` is ``mins = -z * scales``; GGUF Q4_0 (``d * (q - 8)``) is
  ``mins = -8 * d`` and Q4_1 (``d * q + m``) is ``mins = m``. Both products ``q * d`` are exact in fp32, so
  this equals the ``gguf`` package's dequantization bit for bit.

Quantizers here are data-free round-to-nearest (RTN): int8 symmetric per output channel, int4 asymmetric per
group (min/max range with a small clipping search).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

QUANT_METHODS = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128)


@dataclass
class QuantizedWeight:
    """A quantized [N, K] weight (see the module docstring for the layout)."""

    bits: int
    group_size: int
    qweight: torch.Tensor  # bits 8: int8 [N, K]; bits 4: uint8 [N, K // 2]
    scales: torch.Tensor  # [N, K // group_size] fp32 or fp16
    mins: torch.Tensor | None  # like scales, or None (symmetric)

    def __post_init__(self) -> None:
        n, k = self.shape
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        want = torch.int8 if self.bits == 8 else torch.uint8
        if self.qweight.dtype != want or self.qweight.dim() != 2:
            raise ValueError(f"{self.bits}-bit qweight must be 2-D {want}, got {self.qweight.dtype} "
                             f"{tuple(self.qweight.shape)}")
        if self.group_size <= 0 or k % self.group_size or (self.bits == 4 and self.group_size % 2):
            raise ValueError(f"group_size {self.group_size} does not divide K={k}")
        groups = (n, k // self.group_size)
        for name, t in (("scales", self.scales), ("mins", self.mins)):
            if t is None:
                continue
            if t.dtype not in (torch.float32, torch.float16) or tuple(t.shape) != groups:
                raise ValueError(f"{name} must be float32/float16 {groups}, got {t.dtype} {tuple(t.shape)}")
        if self.bits == 4 and self.mins is None:
            raise ValueError("4-bit weights need mins (asymmetric)")

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) of the float weight."""
        n, kq = self.qweight.shape
        return int(n), int(kq) * (2 if self.bits == 4 else 1)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.mins) if t is not None)

    def dequantize(self) -> torch.Tensor:
        """The fp32 [N, K] weight."""
        return dequantize(self.qweight, self.scales, self.mins, self.bits, self.group_size)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors under the names used in saved checkpoints (``qweight``, ``scales``, ``mins``)."""
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.mins is not None:
            out["mins"] = self.mins
        return out


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] -> uint8 [N, K] (low nibble first)."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8/int values 0..15 [N, K] (K even) -> uint8 [N, K // 2] (even k in the low nibble)."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, bits: int,
               group_size: int) -> torch.Tensor:
    """fp32 [N, K]: ``q * scale + min`` per group, in fp32 (bit-exact with GGUF's Q8_0/Q4_0/Q4_1)."""
    q = unpack_int4(qweight) if bits == 4 else qweight
    n, k = q.shape
    qf = q.float().view(n, k // group_size, group_size)  # [N, G, g]
    w = qf * scales.float().unsqueeze(-1)
    if mins is not None:
        w = w + mins.float().unsqueeze(-1)
    return w.view(n, k)


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
    raise ValueError(f"unknown quantization {method!r}; choose from {QUANT_METHODS}")


def parse_method(spec: str | None) -> tuple[str | None, int | None]:
    """``None``/"int8"/"int4"/"int4-g32"/"int4-g64"/"int4-g128"/"gguf" -> (method, group_size). "gguf" keeps a GGUF
    file's Q8_0/Q4_0/Q4_1 tensors as they are (lossless) and leaves its float tensors float."""
    if spec is None:
        return None, None
    if spec == "gguf" or spec == "int8":
        return spec, None
    if spec == "int4":
        return "int4", 128
    if spec.startswith("int4-g") and spec[6:].isdigit() and int(spec[6:]) in INT4_GROUP_SIZES:
        return "int4", int(spec[6:])
    raise ValueError(f"quantization={spec!r} is not supported; choose int8, int4 (group 128), int4-g32, int4-g64, "
                     "int4-g128 or gguf")
