"""Weight-only int8 / int4 matmul (``quant_linear``) in Triton, reading the format of :mod:`fastinfer.quantization`
as it is: ``W[n, k] = q[n, k] * scales[n, k // g] + mins[n, k // g]`` in fp32; int4 bytes hold even k in the low
nibble. Paths, chosen by the number of rows M of x (the thresholds are arguments of :func:`quant_linear`):

- ``M <= gemv_max_m`` (decode, default 1): ``_gemv_kernel``, no ``tl.dot``. A program takes one row of x,
  BLOCK_N output channels and one K slice (split-K). Its weight tile is loaded as [BLOCK_N, groups, SUB_K], so
  each group's scale and min are loaded once and applied after the group's dot product,
  ``s * sum(x q) + m * sum(x)``, all in fp32 (x is never rounded).
- otherwise ``_gemm_kernel``, the dequant-fused GEMM: [SUB_K, BLOCK_N] tiles of W are dequantized in registers
  (``q * s + m`` in fp32, rounded to x's dtype like the torch backend does) and fed to ``tl.dot`` with an fp32
  accumulator. int4 nibbles are not interleaved in registers: a contiguous load of x is split into its even and
  odd columns, which meet the low and the high nibbles (two dots of SUB_K / 2). With ``M <= splitk_max_m``
  (decode batches, BLOCK_M 16) it splits K when the (M, N) tiles are too few to fill the GPU.
- Split-K partial sums go to an fp32 [SPLIT_K, M, N] workspace; ``_splitk_reduce_kernel`` adds them in split
  order (no atomics: the same bits on every run), adds the bias and casts.
- ``M >= fallback_min_m`` on a GPU (large prefill batches): ``_dequant_kernel`` writes W in x's dtype in one pass,
  then torch's matmul. That costs the dequantization pass on top of a bf16 GEMM, so it pays only where the fused
  GEMM is slower than cuBLAS by more than that pass (to be measured: ``benchmarks/gpu_check_quant.py``).

Every K tile lies inside one quantization group: SUB_K divides the group size (a power of two), or the group is
the whole row (per-channel int8, any K). Other group sizes go to the plain-torch path.
No ``@triton.autotune`` (it needs a driver, the CPU interpreter cannot run it): block sizes come from
:func:`gemv_config` / :func:`gemm_config`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

GEMV_MAX_M = 1  # rows handled by the no-dot GEMV kernel
SPLITK_MAX_M = 16  # rows up to which the dot kernel uses BLOCK_M 16 and may split K
FALLBACK_MIN_M = 256  # rows from which a GPU dequantizes + runs torch's matmul (not measured yet, see the bench)


@triton.jit
def _gemv_kernel(
    x_ptr, qw_ptr, s_ptr, mn_ptr, bias_ptr, out_ptr, ws_ptr,
    M, N, K, group_size, split_steps, stride_xm, stride_qn, stride_sn, stride_om,
    BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB_K: tl.constexpr,
    HAS_MINS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
):
    """Grid (M * n_tiles, SPLIT_K), rows fastest (the row programs of one weight tile run together and share it
    through L2). Covers ``split_steps`` BLOCK_K steps of K from ``split * split_steps * BLOCK_K``; each SUB_K-wide
    piece of a BLOCK_K tile lies inside one quantization group. EVEN_K (K a multiple
    of BLOCK_K): no K masks, so the weight loads stay vectorized (a mask that varies along k splits them)."""
    pid = tl.program_id(0)
    m = pid % M
    pid_n = pid // M
    split = tl.program_id(1)
    NG: tl.constexpr = BLOCK_K // SUB_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = offs_n.to(tl.int64)
    offs_g = tl.arange(0, NG)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    k_lo = split * split_steps * BLOCK_K  # (a multiple of BLOCK_K the compiler can see: 16-byte int4 loads)
    k_hi = tl.minimum(k_lo + split_steps * BLOCK_K, K)
    acc = tl.zeros([BLOCK_N, NG], dtype=tl.float32)  # per (channel, sub-tile) partial sums
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kg = k0 + offs_g * SUB_K  # [NG] first k of each sub-tile
        if EVEN_K:
            g_ok = n_ok[:, None]  # (load masks broadcast to the pointer shape)
        else:
            g_ok = n_ok[:, None] & (kg < K)[None, :]  # [BN, NG]
        s_off = rows[:, None] * stride_sn + (kg // group_size)[None, :]
        scale = tl.load(s_ptr + s_off, mask=g_ok, other=0.0).to(tl.float32)  # [BN, NG]
        if BITS == 4:
            offs_j = tl.arange(0, SUB_K // 2)
            ke = kg[:, None] + 2 * offs_j[None, :]  # [NG, SUB_K / 2] even k
            byte = (kg // 2)[:, None] + offs_j[None, :]  # [NG, SUB_K / 2] byte column (contiguous)
            w_ptrs = qw_ptr + rows[:, None, None] * stride_qn + byte[None, :, :]
            if EVEN_K:
                xe = tl.load(x_row + ke).to(tl.float32)
                xo = tl.load(x_row + ke + 1).to(tl.float32)
                p = tl.load(w_ptrs, mask=n_ok[:, None, None], other=0)  # [BN, NG, SUB_K / 2] uint8
            else:
                xe = tl.load(x_row + ke, mask=ke < K, other=0.0).to(tl.float32)
                xo = tl.load(x_row + ke + 1, mask=ke < K, other=0.0).to(tl.float32)
                p = tl.load(w_ptrs, mask=n_ok[:, None, None] & (byte < K // 2)[None, :, :], other=0)
            lo = (p & 0xF).to(tl.float32)
            hi = (p >> 4).to(tl.float32)
            part = tl.sum(lo * xe[None, :, :] + hi * xo[None, :, :], 2)  # [BN, NG]
            xsum = tl.sum(xe + xo, 1)  # [NG]
        else:
            offs_j = tl.arange(0, SUB_K)
            kk = kg[:, None] + offs_j[None, :]  # [NG, SUB_K]
            w_ptrs = qw_ptr + rows[:, None, None] * stride_qn + kk[None, :, :]
            if EVEN_K:
                xv = tl.load(x_row + kk).to(tl.float32)
                q = tl.load(w_ptrs, mask=n_ok[:, None, None], other=0).to(tl.float32)  # [BN, NG, SUB_K]
            else:
                xv = tl.load(x_row + kk, mask=kk < K, other=0.0).to(tl.float32)
                q = tl.load(w_ptrs, mask=n_ok[:, None, None] & (kk < K)[None, :, :], other=0).to(tl.float32)
            part = tl.sum(q * xv[None, :, :], 2)
            xsum = tl.sum(xv, 1)
        acc += part * scale
        if HAS_MINS:
            mins = tl.load(mn_ptr + s_off, mask=g_ok, other=0.0).to(tl.float32)
            acc += mins * xsum[None, :]
    y = tl.sum(acc, 1)  # [BN]
    if SPLIT:
        tl.store(ws_ptr + (split * M + m).to(tl.int64) * N + offs_n, y, mask=n_ok)
    else:
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + m.to(tl.int64) * stride_om + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _gemm_kernel(
    x_ptr, qw_ptr, s_ptr, mn_ptr, bias_ptr, out_ptr, ws_ptr,
    M, N, K, group_size, split_steps, stride_xm, stride_qn, stride_sn, stride_om,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB_K: tl.constexpr,
    GROUP_M: tl.constexpr, HAS_MINS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid (m_tiles * n_tiles, SPLIT_K). Output tiles in grouped order (GROUP_M row tiles walk the same weight
    columns while they sit in L2). Each BLOCK_K step runs BLOCK_K / SUB_K unrolled sub-tiles, one group each.
    EVEN_K as in ``_gemv_kernel``."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # [BM, 1]
    w_cols = qw_ptr + offs_n.to(tl.int64)[None, :] * stride_qn  # [1, BN]
    s_cols = offs_n.to(tl.int64) * stride_sn  # [BN]
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_lo = split * split_steps * BLOCK_K  # (a multiple of BLOCK_K the compiler can see: 16-byte int4 loads)
    k_hi = tl.minimum(k_lo + split_steps * BLOCK_K, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        for j in tl.static_range(BLOCK_K // SUB_K):
            kb = k0 + j * SUB_K  # first k of this sub-tile (inside one group)
            if EVEN_K:
                s_ok = n_ok
            else:  # a vector compare (the interpreter mis-types ``vector & scalar``)
                s_ok = n_ok & (offs_n * 0 + kb < K)
            g = kb // group_size
            scale = tl.load(s_ptr + s_cols + g, mask=s_ok, other=0.0).to(tl.float32)[None, :]  # [1, BN]
            shift = tl.zeros_like(scale)
            if HAS_MINS:
                shift = tl.load(mn_ptr + s_cols + g, mask=s_ok, other=0.0).to(tl.float32)[None, :]
            if BITS == 4:
                offs_j = tl.arange(0, SUB_K // 2)
                kk = kb + tl.arange(0, SUB_K)
                byte = kb // 2 + offs_j  # [SUB_K / 2]
                if EVEN_K:
                    x_ok = m_ok[:, None]
                    w_ok = n_ok[None, :]
                else:
                    x_ok = m_ok[:, None] & (kk < K)[None, :]
                    w_ok = (byte < K // 2)[:, None] & n_ok[None, :]
                xv = tl.load(x_rows + kk[None, :], mask=x_ok, other=0.0)  # [BM, SUB_K], vectorized
                xe, xo = tl.split(tl.reshape(xv, [BLOCK_M, SUB_K // 2, 2]))  # even / odd columns [BM, SUB_K / 2]
                p = tl.load(w_cols + byte[:, None], mask=w_ok, other=0)  # [SUB_K / 2, BN] uint8
                w_lo = ((p & 0xF).to(tl.float32) * scale + shift).to(dt)
                w_hi = ((p >> 4).to(tl.float32) * scale + shift).to(dt)
                acc = tl.dot(xe, w_lo, acc, input_precision=DOT_PRECISION)
                acc = tl.dot(xo, w_hi, acc, input_precision=DOT_PRECISION)
            else:
                kk = kb + tl.arange(0, SUB_K)
                if EVEN_K:
                    x_ok = m_ok[:, None]
                    w_ok = n_ok[None, :]
                else:
                    x_ok = m_ok[:, None] & (kk < K)[None, :]
                    w_ok = (kk < K)[:, None] & n_ok[None, :]
                xv = tl.load(x_rows + kk[None, :], mask=x_ok, other=0.0)  # [BM, SUB_K]
                q = tl.load(w_cols + kk[:, None], mask=w_ok, other=0)  # [SUB_K, BN] int8
                w = (q.to(tl.float32) * scale + shift).to(dt)
                acc = tl.dot(xv, w, acc, input_precision=DOT_PRECISION)
    mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT:
        ws_off = (split * M + offs_m).to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(ws_ptr + ws_off, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out_off = offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _splitk_reduce_kernel(ws_ptr, bias_ptr, out_ptr, M, N, split_k, stride_om,
                          BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Grid (M, cdiv(N, BLOCK)): ``out[m] = sum over splits, in split order, of ws[s, m] (+ bias)``."""
    m = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    y = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(split_k):
        y += tl.load(ws_ptr + (s * M + m).to(tl.int64) * N + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + m.to(tl.int64) * stride_om + offs, y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dequant_kernel(qw_ptr, s_ptr, mn_ptr, w_ptr, N, K, group_size, stride_qn, stride_sn, stride_wn,
                    BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_MINS: tl.constexpr):
    """Grid (cdiv(N, BLOCK_N), cdiv(K, BLOCK_K)): W [N, K] = q * s + m (fp32) in w's dtype. A tile lies inside
    one quantization group."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    n_ok = offs_n < N
    rows = offs_n.to(tl.int64)
    g = k0 // group_size
    scale = tl.load(s_ptr + rows * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)[:, None]  # [BN, 1]
    shift = tl.zeros_like(scale)
    if HAS_MINS:
        shift = tl.load(mn_ptr + rows * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    if BITS == 4:
        byte = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        p = tl.load(qw_ptr + rows[:, None] * stride_qn + byte[None, :],
                    mask=n_ok[:, None] & (byte < K // 2)[None, :], other=0)  # [BN, BLOCK_K / 2]
        w = tl.interleave((p & 0xF).to(tl.float32) * scale + shift, (p >> 4).to(tl.float32) * scale + shift)
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        q = tl.load(qw_ptr + rows[:, None] * stride_qn + offs_k[None, :],
                    mask=n_ok[:, None] & (offs_k < K)[None, :], other=0)  # [BN, BLOCK_K]
        w = q.to(tl.float32) * scale + shift
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(w_ptr + rows[:, None] * stride_wn + offs_k[None, :], w.to(w_ptr.dtype.element_ty),
             mask=n_ok[:, None] & (offs_k < K)[None, :])


# ----------------------------------------------------------------------------------------------- launchers


@dataclass(frozen=True)
class QuantConfig:
    """Launch parameters of one quant_linear kernel call. ``sub_k`` is the width of a K piece that lies inside
    one quantization group; ``block_k`` (a multiple of it) is the K step of the loop."""

    block_m: int
    block_n: int
    block_k: int
    sub_k: int
    split_k: int
    k_split: int  # K per split, a multiple of block_k
    num_warps: int
    num_stages: int


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _programs_target(device: torch.device) -> int:
    """How many programs fill the device: four per SM on a GPU; a nominal 4 under the interpreter (so the small
    test shapes split K too)."""
    if device.type != "cuda":
        return 4
    return 4 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def sub_tile(bits: int, group_size: int, k: int, block_k: int) -> int | None:
    """Width of the K pieces that stay inside one group for a loop step of ``block_k``, or None when the group
    size is not supported (not a power of two >= 16 (int8) / 32 (int4, tl.dot needs K >= 16 per nibble half),
    and not the whole row)."""
    if group_size == k:
        return block_k
    if group_size & (group_size - 1) == 0 and group_size >= (32 if bits == 4 else 16):
        return min(group_size, block_k)
    return None


def _split(tiles: int, k: int, block_k: int, target: int, min_steps: int, max_split: int) -> tuple[int, int]:
    """(SPLIT_K, k_split): enough programs for ``target``, each K slice at least ``min_steps`` BLOCK_K steps
    (k_split a multiple of block_k; empty trailing splits are dropped)."""
    steps = triton.cdiv(k, block_k)
    split = max(1, min(triton.cdiv(target, max(tiles, 1)), steps // max(min_steps, 1), max_split))
    k_split = triton.cdiv(steps, split) * block_k
    return triton.cdiv(k, k_split), k_split


def gemv_config(n: int, k: int, bits: int, group_size: int, device: torch.device, split_k: int | None = None,
                block_n: int | None = None, block_k: int | None = None, num_warps: int | None = None
                ) -> QuantConfig | None:
    """Blocks of the no-dot GEMV kernel: 128 weight bytes per row per step on a GPU, split-K until about four
    programs per SM (``block_n`` / ``block_k`` / ``num_warps`` override the choice, for sweeps). None when the
    group size is not supported."""
    on_gpu = device.type == "cuda"
    bn, bk, warps, stages = (32, (256 if bits == 4 else 128), 4, 2) if on_gpu else (16, 64, 1, 1)
    block_n, block_k, warps = block_n or bn, block_k or bk, num_warps or warps
    sub = sub_tile(bits, group_size, k, block_k)
    if sub is None:
        return None
    tiles = triton.cdiv(n, block_n)
    if split_k is None:
        split, k_split = _split(tiles, k, block_k, _programs_target(device), 4 if on_gpu else 1, 32)
    else:
        split, k_split = _split(1, k, block_k, split_k, 1, split_k)
    return QuantConfig(1, block_n, block_k, sub, split, k_split, warps, stages)


def gemm_config(m: int, n: int, k: int, bits: int, group_size: int, dtype: torch.dtype, device: torch.device,
                may_split: bool, split_k: int | None = None) -> QuantConfig | None:
    """Blocks of the dequant-fused GEMM: BLOCK_M from M (16 for decode batches), wider tiles for prefill; fp32
    (a correctness path on GPUs) gets small tiles. ``may_split``: split K while the output tiles are fewer than
    about four programs per SM. None when the group size is not supported."""
    on_gpu = device.type == "cuda"
    if not on_gpu:
        bm, bn, bk, warps, stages = (16 if m <= 16 else 32), 32, 64, 4, 1
    elif dtype == torch.float32:
        bm, bn, bk, warps, stages = min(64, max(16, triton.next_power_of_2(m))), 64, 32, 4, 2
    elif m <= 16:
        bm, bn, bk, warps, stages = 16, 64, 128, 4, 3
    elif m <= 32:
        bm, bn, bk, warps, stages = 32, 64, 128, 4, 3
    elif m <= 64:
        bm, bn, bk, warps, stages = 64, 64, 64, 4, 4
    else:
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
    if bits == 4:
        bk = max(bk, 32)
    sub = sub_tile(bits, group_size, k, bk)
    if sub is None:
        return None
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    if split_k is not None:
        split, k_split = _split(1, k, bk, split_k, 1, split_k)
    elif may_split:
        split, k_split = _split(tiles, k, bk, _programs_target(device), 4 if on_gpu else 1, 16)
    else:
        split, k_split = 1, triton.cdiv(k, bk) * bk
    return QuantConfig(bm, bn, bk, sub, split, k_split, warps, stages)


def select_path(m: int, device: torch.device, gemv_max_m: int = GEMV_MAX_M, splitk_max_m: int = SPLITK_MAX_M,
                fallback_min_m: int | None = None) -> str:
    """Which path ``quant_linear`` takes for M rows: "gemv", "splitk" (dot kernel, BLOCK_M 16, may split K),
    "gemm" or "fallback" (dequantize + torch matmul). ``fallback_min_m`` None: FALLBACK_MIN_M on a GPU, never
    on CPU (the interpreter)."""
    if fallback_min_m is None:
        fallback_min_m = FALLBACK_MIN_M if device.type == "cuda" else -1
    if 0 < fallback_min_m <= m:
        return "fallback"
    if m <= gemv_max_m:
        return "gemv"
    return "splitk" if m <= splitk_max_m else "gemm"


def check_quant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                       bits: int, group_size: int, bias: torch.Tensor | None) -> tuple[int, int]:
    """(N, K) after asserting devices, dtypes, shapes and contiguity (metadata only)."""
    assert bits in (4, 8), f"bits must be 4 or 8, got {bits}"
    want = torch.int8 if bits == 8 else torch.uint8
    assert qweight.dtype == want and qweight.dim() == 2, f"{bits}-bit qweight must be 2-D {want}, got {qweight.dtype}"
    assert qweight.is_contiguous(), "qweight must be contiguous"
    n = qweight.shape[0]
    k = qweight.shape[1] * (2 if bits == 4 else 1)
    assert group_size > 0 and k % group_size == 0, f"group_size {group_size} does not divide K={k}"
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported x dtype {x.dtype}"
    assert x.dim() >= 1 and x.shape[-1] == k, f"x [..., {k}] expected, got {tuple(x.shape)}"
    groups = (n, k // group_size)
    for name, t in (("scales", scales), ("mins", mins)):
        if t is None:
            continue
        assert t.dtype in (torch.float32, torch.float16), f"{name} must be float32/float16, got {t.dtype}"
        assert tuple(t.shape) == groups, f"{name} must be {groups}, got {tuple(t.shape)}"
        assert t.is_contiguous(), f"{name} must be contiguous"
        assert t.device == x.device, f"{name} on {t.device}, x on {x.device}"
    if bias is not None:
        assert tuple(bias.shape) == (n,) and bias.is_contiguous(), f"bias must be [{n}] contiguous"
        assert bias.is_floating_point() and bias.device == x.device, "bias must be a float tensor on x's device"
    assert qweight.device == x.device, f"qweight on {qweight.device}, x on {x.device}"
    return n, k


def _check_config(c: QuantConfig, bits: int, group_size: int, k: int, path: str) -> None:
    """A forced config must keep every SUB_K piece inside one group and split K on BLOCK_K steps."""
    assert c.block_k % c.sub_k == 0 and c.k_split % c.block_k == 0, f"inconsistent {c}"
    assert group_size == k or group_size % c.sub_k == 0, f"sub_k {c.sub_k} crosses groups of {group_size}"
    assert c.sub_k >= (32 if bits == 4 else 16) or path == "gemv", f"sub_k {c.sub_k} too small for tl.dot"
    assert c.split_k == triton.cdiv(k, c.k_split), f"split_k {c.split_k} != cdiv(K={k}, k_split={c.k_split})"


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products (no TF32), like the reference."""
    return "ieee" if dtype == torch.float32 else "tf32"


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, bits: int, group_size: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [N, K] in ``dtype``, one pass (``q * s + m`` in fp32, then rounded): what the large-M fallback feeds to
    torch's matmul. Group sizes the kernels do not support go through :func:`fastinfer.quantization.dequantize`."""
    x_like = torch.empty(0, qweight.shape[1] * (2 if bits == 4 else 1), dtype=dtype, device=qweight.device)
    n, k = check_quant_linear(x_like, qweight, scales, mins, bits, group_size, None)
    block_k = 128 if qweight.is_cuda else 64
    sub = sub_tile(bits, group_size, k, block_k)
    if sub is None:
        from fastinfer.quantization import dequantize as torch_dequantize

        return torch_dequantize(qweight, scales, mins, bits, group_size).to(dtype)
    w = torch.empty(n, k, dtype=dtype, device=qweight.device)  # [N, K]
    if n == 0 or k == 0:
        return w
    block_n = max(16, min(128, 4096 // sub)) if qweight.is_cuda else 16  # about 4096 weights per program
    _dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, sub))](
        qweight, scales, scales if mins is None else mins, w, n, k, group_size,
        qweight.stride(0), scales.stride(0), w.stride(0),
        BITS=bits, BLOCK_N=block_n, BLOCK_K=sub, HAS_MINS=mins is not None, num_warps=4,
    )
    return w


def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                 bits: int, group_size: int, bias: torch.Tensor | None = None, *, gemv_max_m: int = GEMV_MAX_M,
                 splitk_max_m: int = SPLITK_MAX_M, fallback_min_m: int | None = None,
                 split_k: int | None = None, config: QuantConfig | None = None) -> torch.Tensor:
    """Weight-only quantized ``x @ W.T + bias`` for x [..., K] -> [..., N] in x's dtype: the semantics of
    :func:`fastinfer.ops.reference.quant_linear`. The path follows M = x.numel() // K (see :func:`select_path`);
    ``split_k`` forces the number of K splits of the Triton kernels (1 = no workspace, no reduction kernel);
    ``config`` forces the whole launch configuration of the chosen kernel (benchmarks, tests)."""
    n, k = check_quant_linear(x, qweight, scales, mins, bits, group_size, bias)
    x2 = x.reshape(-1, k)  # [M, K]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0 or n == 0:
        return x.new_zeros(*x.shape[:-1], n)  # [..., N] (K == 0 is not a valid format either)
    path = select_path(m, x.device, gemv_max_m, splitk_max_m, fallback_min_m)
    cfg: QuantConfig | None = None
    if config is not None and path != "fallback":
        _check_config(config, bits, group_size, k, path)
        cfg = config
    elif path == "gemv":
        cfg = gemv_config(n, k, bits, group_size, x.device, split_k)
    elif path != "fallback":
        cfg = gemm_config(m, n, k, bits, group_size, x.dtype, x.device, path == "splitk", split_k)
    if cfg is None:  # the fallback path, or a group size the kernels do not take
        w = dequantize(qweight, scales, mins, bits, group_size, x.dtype)  # [N, K]
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)  # [M, N]
    split = cfg.split_k > 1
    ws = torch.empty(cfg.split_k, m, n, dtype=torch.float32, device=x.device) if split else out  # [S, M, N]
    mn = scales if mins is None else mins
    b = out if bias is None else bias
    common = (x2, qweight, scales, mn, b, out, ws, m, n, k, group_size, cfg.k_split // cfg.block_k,
              x2.stride(0), qweight.stride(0), scales.stride(0), out.stride(0))
    if path == "gemv":
        _gemv_kernel[(m * triton.cdiv(n, cfg.block_n), cfg.split_k)](
            *common, BITS=bits, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SUB_K=cfg.sub_k,
            HAS_MINS=mins is not None, HAS_BIAS=bias is not None, SPLIT=split, EVEN_K=k % cfg.block_k == 0,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    else:
        _gemm_kernel[(triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.split_k)](
            *common, BITS=bits, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SUB_K=cfg.sub_k,
            GROUP_M=8, HAS_MINS=mins is not None, HAS_BIAS=bias is not None, SPLIT=split,
            EVEN_K=k % cfg.block_k == 0, DOT_PRECISION=_dot_precision(x.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    if split:
        block = min(1024, triton.next_power_of_2(n))
        _splitk_reduce_kernel[(m, triton.cdiv(n, block))](
            ws, b, out, m, n, cfg.split_k, out.stride(0), BLOCK=block, HAS_BIAS=bias is not None,
            num_warps=4,
        )
    return out.view(*x.shape[:-1], n)


__all__ = ["quant_linear", "check_quant_linear", "dequantize", "select_path", "gemv_config", "gemm_config",
           "sub_tile", "QuantConfig", "GEMV_MAX_M", "SPLITK_MAX_M", "FALLBACK_MIN_M"]
