"""Weight-only quantization formats: W8A16 (int8) and W4A16 (int4), both group-wise.

One format for every backend (the kernels read it as is), described by :class:`QuantizedWeight`:

- ``bits=8``: ``qweight`` int8 [N, K], values -127..127 (GGUF Q8_0 may also hold -128); ``mins`` None for
  our own int8 and GGUF's symmetric types. ``group_size == K`` is per-output-channel (our
  ``quantization="int8"``); 32 is GGUF Q8_0 / Q5_0 / Q5_1 / Q5_K, 16 is Q6_K / Q3_K / Q2_K.
- ``bits=4``: ``qweight`` uint8 [N, K // 2]; byte ``(n, j)`` holds ``q[n, 2j]`` in its low nibble and
  ``q[n, 2j + 1]`` in its high nibble, values 0..15.
- ``scales`` and ``mins`` are [N, K // group_size], float32 or float16 (GGUF's own f16 ``d``/``m`` are kept
  as they are, so the import is lossless). The weight is

      w[n, k] = q[n, k] * scales[n, g] + mins[n, g]      (g = k // group_size; + 0 when mins is None)

  computed in fp32. An asymmetric zero point ``z`` is ``mins = -z * scales``; GGUF Q4_0 (``d * (q - 8)``) is
  ``mins = -8 * d`` and Q4_1 (``d * q + m``) is ``mins = m``; Q4_K's super-block scales multiply out to fp32
  ``scales = d * sc`` and ``mins = -dmin * m`` per 32 (exact in fp32, not in f16). Every product ``q * scale``
  is exact in fp32, so this equals the ``gguf`` package's dequantization bit for bit.

Quantizers: :mod:`fastinfer.quantization.rtn` (data-free round-to-nearest) and
:mod:`fastinfer.quantization.gptq` (calibrated); :mod:`fastinfer.quantization.methods` says which method a
layer's weight belongs to and how it is applied.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


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
    """fp32 [N, K]: ``q * scale + min`` per group, in fp32 (bit-exact with the GGUF block types)."""
    q = unpack_int4(qweight) if bits == 4 else qweight
    n, k = q.shape
    qf = q.float().view(n, k // group_size, group_size)  # [N, G, g]
    w = qf * scales.float().unsqueeze(-1)
    if mins is not None:
        w = w + mins.float().unsqueeze(-1)
    return w.view(n, k)


def widen(qw: QuantizedWeight, bits: int, group_size: int, scale_dtype: torch.dtype, with_mins: bool,
          ) -> QuantizedWeight:
    """The same weight in a format at least as wide, without loss: int4 -> int8 (the values 0..15 and the
    mins kept), groups split into ``group_size`` (which must divide the group; scales repeated), fp16 -> fp32
    scales, and zero mins added (a ``-0.0`` weight then reads ``+0.0``). Lets fused projections whose GGUF
    tensors have different types (Q4_K q/k with a Q6_K v) share one format."""
    if qw.group_size % group_size or (bits < qw.bits) or (qw.mins is not None and not with_mins):
        raise ValueError(f"cannot widen int{qw.bits} g{qw.group_size} to int{bits} g{group_size}"
                         f"{'' if with_mins else ' without mins'}")
    if qw.scales.dtype == torch.float32 and scale_dtype == torch.float16:
        raise ValueError("cannot widen fp32 scales to fp16")
    q = qw.qweight if bits == qw.bits else unpack_int4(qw.qweight).to(torch.int8)
    rep = qw.group_size // group_size
    scales = qw.scales.to(scale_dtype).repeat_interleave(rep, dim=1)
    mins = qw.mins if qw.mins is not None or not with_mins else torch.zeros_like(qw.scales)
    mins = None if mins is None else mins.to(scale_dtype).repeat_interleave(rep, dim=1)
    return QuantizedWeight(bits, group_size, q, scales, mins)


def common_format(parts: list[QuantizedWeight]) -> list[QuantizedWeight]:
    """``parts`` in one format: unchanged when they share one, else each widened, losslessly, to the narrowest
    format that holds them all (:func:`widen`: the widest bits, the gcd of the groups, fp32 scales if any part has
    them, mins if any part has them). A GGUF file may mix types within a fused projection or across experts."""
    if len({(p.bits, p.group_size, p.scales.dtype, p.mins is None) for p in parts}) <= 1:
        return parts
    bits, group = max(p.bits for p in parts), math.gcd(*(p.group_size for p in parts))
    f32 = any(p.scales.dtype == torch.float32 for p in parts)
    with_mins = any(p.mins is not None for p in parts)
    return [widen(p, bits, group, torch.float32 if f32 else torch.float16, with_mins) for p in parts]


@dataclass
class QuantizedExperts:
    """``E`` quantized [N, K] weights of one format stacked (a Mixture-of-Experts projection, the layout
    ``fused_moe`` reads): ``qweight`` [E, N, K] int8 or [E, N, K // 2] uint8 (the packing of
    :class:`QuantizedWeight`), ``scales`` and ``mins`` [E, N, K // group_size] **float32** (GGUF's f16 scales
    widened, losslessly, so one kernel path reads every file), ``mins`` None for symmetric int8."""

    bits: int
    group_size: int
    qweight: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None

    def __post_init__(self) -> None:
        if self.qweight.dim() != 3:
            raise ValueError(f"stacked expert qweight must be 3-D [E, N, K'], got {tuple(self.qweight.shape)}")
        for name, t in (("scales", self.scales), ("mins", self.mins)):
            if t is not None and t.dtype != torch.float32:
                raise ValueError(f"stacked expert {name} must be float32, got {t.dtype}")
        self.expert(0)  # validates the per-expert format (bits, dtypes, group shapes)

    @classmethod
    def stack(cls, parts: list[QuantizedWeight]) -> QuantizedExperts:
        """One weight per expert, in expert order (formats unified by :func:`common_format`)."""
        if not parts:
            raise ValueError("no expert weights to stack")
        parts = common_format(parts)
        if len({p.shape for p in parts}) > 1:
            raise ValueError(f"expert weights differ in shape: {sorted({p.shape for p in parts})}")
        f = parts[0]
        return cls(f.bits, f.group_size, torch.stack([p.qweight for p in parts]),
                   torch.stack([p.scales.float() for p in parts]),
                   None if f.mins is None else torch.stack([p.mins.float() for p in parts if p.mins is not None]))

    @property
    def num_experts(self) -> int:
        return int(self.qweight.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(E, N, K) of the float weights."""
        e, n, kq = self.qweight.shape
        return int(e), int(n), int(kq) * (2 if self.bits == 4 else 1)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.mins) if t is not None)

    def expert(self, e: int) -> QuantizedWeight:
        """Expert ``e``'s [N, K] weight (views, no copy)."""
        return QuantizedWeight(self.bits, self.group_size, self.qweight[e], self.scales[e],
                               None if self.mins is None else self.mins[e])

    def dequantize(self) -> torch.Tensor:
        """The fp32 [E, N, K] weights."""
        return torch.stack([self.expert(e).dequantize() for e in range(self.num_experts)])

    def to(self, device: torch.device | str) -> QuantizedExperts:
        return QuantizedExperts(self.bits, self.group_size, self.qweight.to(device), self.scales.to(device),
                                None if self.mins is None else self.mins.to(device))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors under the names used in saved checkpoints (as :meth:`QuantizedWeight.tensors`)."""
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.mins is not None:
            out["mins"] = self.mins
        return out


def from_tensors(parts: dict[str, torch.Tensor]) -> QuantizedWeight | QuantizedExperts:
    """A weight from its stored tensors (``qweight``, ``scales``, optional ``mins``, as :meth:`QuantizedWeight.tensors`
    names them): the bits follow ``qweight``'s dtype (int8 / uint8), the group size the shapes; a 3-D ``qweight``
    is a stack of experts (:class:`QuantizedExperts`)."""
    for name in ("qweight", "scales"):
        if name not in parts:
            raise ValueError(f"lacks {name}")
    qweight, scales = parts["qweight"], parts["scales"]
    bits = 8 if qweight.dtype == torch.int8 else 4
    k = qweight.shape[-1] * (2 if bits == 4 else 1)
    if scales.dim() != qweight.dim() or scales.shape[-1] < 1 or k % scales.shape[-1]:
        raise ValueError(f"has scales of shape {tuple(scales.shape)}")
    if qweight.dim() == 3:
        return QuantizedExperts(bits, k // scales.shape[-1], qweight, scales, parts.get("mins"))
    return QuantizedWeight(bits, k // scales.shape[1], qweight, scales, parts.get("mins"))
