"""GGML block types in torch: every common quantized type decodes to integers, scales and mins.

Each decoder takes a tensor's raw blocks (uint8 [n_blocks, block_bytes]) and returns ``(q, scales, mins,
group)``: int8 values q [n_blocks, block_size] and per-group ``scales`` / ``mins`` [n_blocks, block_size //
group] (float16 when they are the file's own f16 numbers, else float32; ``mins`` None when there are none)
with

    w = q * scale + min      (in fp32, one rounding at most: the ``+ min``)

which is the computation ``gguf.quants.dequantize`` does, so :func:`dequantize` equals it bit for bit. The
super-block types' scales are products of an f16 factor and a 4-, 6- or 8-bit integer (``d * sc``,
``dmin * m``): at most 19 significant bits, exact in fp32 (not in f16), so they are stored in fp32.

The same decomposition is the lossless import into our weight-only format (:func:`to_quantized`): 4-bit types
with groups of 32 (Q4_0, Q4_1, Q4_K) become int4 g32, every other type int8 with its own group size (32, or 16
for Q2_K / Q3_K / Q6_K); a 3-D tensor (a MoE layer's stacked experts, [E, N, K]) is E * N rows of blocks and
imports as :class:`~fastinfer.quantization.format.QuantizedExperts`. Types without a decoder here (the IQ*, TQ*
and FP4 types) are dequantized by the ``gguf`` package (numpy), logged once per type; a type it cannot read
either raises a ValueError.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fastinfer.quantization.format import QuantizedExperts, QuantizedWeight, pack_int4
from fastinfer.quantization.format import dequantize as dequantize_groups

logger = logging.getLogger("fastinfer")

Decoded = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None", int]  # q, scales, mins, group size


def _f16(b: torch.Tensor, at: int) -> torch.Tensor:
    """The f16 number at byte ``at`` of every block: [n, 1] float16."""
    return b[:, at:at + 2].contiguous().view(torch.float16)


def _nibbles(b: torch.Tensor, chunk: int) -> torch.Tensor:
    """[n, bytes] -> [n, 2 * bytes] uint8: per ``chunk`` bytes, the low nibbles first, then the high ones."""
    n = b.shape[0]
    x = b.reshape(n, -1, 1, chunk) >> torch.tensor([0, 4], dtype=torch.uint8).view(1, 1, 2, 1)
    return (x & 0x0F).reshape(n, -1)


def _bits(b: torch.Tensor, chunk: int, width: int) -> torch.Tensor:
    """[n, bytes] -> [n, (8 // width) * bytes] uint8: per ``chunk`` bytes, the ``width``-bit fields from the
    lowest bits up (all bytes' field 0, then all bytes' field 1, ...)."""
    n = b.shape[0]
    shifts = torch.arange(0, 8, width, dtype=torch.uint8).view(1, 1, -1, 1)
    return ((b.reshape(n, -1, 1, chunk) >> shifts) & ((1 << width) - 1)).reshape(n, -1)


def _q8_0(b: torch.Tensor) -> Decoded:  # d f16 | 32 x int8
    return b[:, 2:].contiguous().view(torch.int8), _f16(b, 0), None, 32


def _q4_0(b: torch.Tensor) -> Decoded:  # d | 16 bytes of nibbles: d * (q - 8)
    return _nibbles(b[:, 2:], 16).to(torch.int8) - 8, _f16(b, 0), None, 32


def _q4_1(b: torch.Tensor) -> Decoded:  # d | m | 16 bytes of nibbles: d * q + m
    return _nibbles(b[:, 4:], 16).to(torch.int8), _f16(b, 0), _f16(b, 2), 32


def _q5(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1 values 0..31: the nibbles plus bit j of the 32-bit little-endian ``qh`` as bit 4 of weight j."""
    return (_nibbles(qs, 16) | (_bits(qh, 4, 1).reshape(-1, 8, 4).transpose(1, 2).reshape(-1, 32) << 4)
            ).to(torch.int8)


def _q5_0(b: torch.Tensor) -> Decoded:  # d | qh (4 bytes) | 16 bytes of nibbles: d * (q - 16)
    return _q5(b[:, 2:6], b[:, 6:]) - 16, _f16(b, 0), None, 32


def _q5_1(b: torch.Tensor) -> Decoded:  # d | m | qh | nibbles: d * q + m
    return _q5(b[:, 4:8], b[:, 8:]), _f16(b, 0), _f16(b, 2), 32


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> eight 6-bit scales and eight 6-bit mins (uint8 [n, 8] each)."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _super_scales(b: torch.Tensor, sc: torch.Tensor, mn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``d * sc`` and ``-(dmin * m)`` of a Q4_K/Q5_K block (d, dmin: its first two f16)."""
    return _f16(b, 0).float() * sc.float(), -(_f16(b, 2).float() * mn.float())


def _q4_k(b: torch.Tensor) -> Decoded:  # d | dmin | 12 scale bytes | 128 bytes of nibbles (per 32 bytes)
    sc, mn = _k_scales(b[:, 4:16])
    s, m = _super_scales(b, sc, mn)
    return _nibbles(b[:, 16:], 32).to(torch.int8), s, m, 32


def _q5_k(b: torch.Tensor) -> Decoded:  # d | dmin | 12 scale bytes | qh (32 bytes) | 128 bytes of nibbles
    sc, mn = _k_scales(b[:, 4:16])
    s, m = _super_scales(b, sc, mn)
    q = _nibbles(b[:, 48:], 32) | (_bits(b[:, 16:48], 32, 1) << 4)  # group g's bit 4: bit g of qh[i]
    return q.to(torch.int8), s, m, 32


def _q6_k(b: torch.Tensor) -> Decoded:  # ql (128) | qh (64) | 16 int8 scales | d: d * sc * (q - 32)
    ql = _nibbles(b[:, :128], 64)  # per 64 bytes: low nibbles, high nibbles
    qh = _bits(b[:, 128:192], 32, 2)  # per 32 bytes: four 2-bit fields
    q = (ql | (qh << 4)).to(torch.int8) - 32
    return q, _f16(b, 208).float() * b[:, 192:208].contiguous().view(torch.int8).float(), None, 16


def _q2_k(b: torch.Tensor) -> Decoded:  # 16 scale bytes | qs (64) | d | dmin: d * sc * q - dmin * m
    sc = b[:, :16]
    s = _f16(b, 80).float() * (sc & 0x0F).float()
    m = -(_f16(b, 82).float() * (sc >> 4).float())
    return _bits(b[:, 16:80], 32, 2).to(torch.int8), s, m, 16


def _q3_k(b: torch.Tensor) -> Decoded:  # hmask (32) | qs (64) | 12 scale bytes | d: d * (sc - 32) * q
    s12 = b[:, 96:108]
    sc = (_nibbles(s12[:, :8], 8) | (_bits(s12[:, 8:12], 4, 2) << 4)).to(torch.int8) - 32
    low = _bits(b[:, 32:96], 32, 2).to(torch.int8)
    high = _bits(b[:, :32], 32, 1).to(torch.int8)  # a clear bit subtracts 4
    return low - ((1 - high) << 2), _f16(b, 108).float() * sc.float(), None, 16


_DECODERS: dict[str, tuple[int, Callable[[torch.Tensor], Decoded]]] = {  # type -> (block bytes, decoder)
    "Q8_0": (34, _q8_0), "Q4_0": (18, _q4_0), "Q4_1": (20, _q4_1), "Q5_0": (22, _q5_0), "Q5_1": (24, _q5_1),
    "Q2_K": (84, _q2_k), "Q3_K": (110, _q3_k), "Q4_K": (144, _q4_k), "Q5_K": (176, _q5_k), "Q6_K": (210, _q6_k),
}
NATIVE_TYPES = ("F32", "F16", "BF16", *_DECODERS)
_LOGGED: set[str] = set()


def _raw(t: Any) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only memmap: we never write to it
        return torch.from_numpy(np.asarray(t.data))


def decode(t: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int] | None:
    """(q int8 [rows, K], scales [rows, K // g], mins or None, g) of a quantized GGUF tensor (``t``: a
    ``gguf.ReaderTensor``, shape [K, N, ...]; ``rows`` the product of all but K: N, or E * N for stacked experts);
    None for the float types and types without a decoder."""
    entry = _DECODERS.get(t.tensor_type.name)
    if entry is None:
        return None
    nbytes, fn = entry
    k = int(t.shape[0])
    n = int(np.prod([int(x) for x in t.shape[1:]]))
    q, s, m, g = fn(_raw(t).reshape(-1, nbytes))
    return q.reshape(n, k), s.reshape(n, k // g), None if m is None else m.reshape(n, k // g), g


def dequantize(t: Any) -> torch.Tensor:
    """One GGUF tensor as fp32 in torch layout (GGUF's shape reversed: [out, in]), bit-exact with
    ``gguf.quants.dequantize``."""
    import gguf

    shape = tuple(int(x) for x in reversed(t.shape))
    kind = t.tensor_type.name
    if kind in ("F32", "F16", "BF16"):
        raw = _raw(t)
        return (raw.view(torch.bfloat16) if kind == "BF16" else raw).reshape(shape).float()
    d = decode(t)
    if d is not None:
        q, s, m, g = d
        return dequantize_groups(q, s, m, 8, g).reshape(shape)
    try:
        out = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
        raise ValueError(f"GGUF tensor {t.name!r}: type {kind} cannot be dequantized (neither fastinfer nor "
                         f"the gguf package reads it)") from e
    if kind not in _LOGGED:
        _LOGGED.add(kind)
        logger.warning("GGUF type %s has no torch decoder: dequantized by the gguf package (numpy, slower)", kind)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(shape)


def to_quantized(t: Any) -> QuantizedWeight | QuantizedExperts | None:
    """A quantized GGUF tensor in our weight-only format, lossless (None for float types, types without a
    decoder and tensors of other than 2 or 3 dimensions): Q4_0 / Q4_1 / Q4_K as int4 g32 (Q4_0's ``d * (q - 8)``
    as ``q * d + (-8 d)``), all others as int8 with their own group size. A 2-D [N, K] tensor gives a
    :class:`QuantizedWeight`; a 3-D one, stacked experts [E, N, K] (GGUF shape [K, N, E], blocks along K in every
    row), a :class:`QuantizedExperts` (scales and mins in fp32, as it holds them). Dequantizing the result equals
    ``gguf``'s values exactly (Q4_0: equal values; a ``-0.0`` of gguf's may come out as ``+0.0``)."""
    if len(t.shape) not in (2, 3):
        return None
    d = decode(t)
    if d is None:
        return None
    q, s, m, g = d
    bits = 4 if t.tensor_type.name in ("Q4_0", "Q4_1", "Q4_K") else 8
    if bits == 4 and m is None:  # Q4_0: q - 8 -> q with min -8 d (exact in fp32; kept f16 where it is exact too)
        m32 = s.float() * -8.0
        m = m32.half() if bool((m32.half().float() == m32).all()) else m32
        q = q + 8
    qweight = pack_int4(q) if bits == 4 else q
    if len(t.shape) == 2:
        return QuantizedWeight(bits, g, qweight, s, m)
    e = int(t.shape[2])
    return QuantizedExperts(bits, g, qweight.reshape(e, -1, qweight.shape[-1]), s.float().reshape(e, -1, s.shape[-1]),
                            None if m is None else m.float().reshape(e, -1, m.shape[-1]))
