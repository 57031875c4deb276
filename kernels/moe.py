"""Fused Mixture-of-Experts (``fused_moe``) in Triton: the semantics of :func:`fastinfer.ops.reference.fused_moe`,
``out[t] = sum_j w[t, j] * w2[e] @ (silu(w13[e, :I] @ x[t]) * (w13[e, I:] @ x[t]))`` with ``e = topk_ids[t, j]``.

Three steps, no host synchronisation (every size is a bound known from the shapes):

1. :func:`moe_align` (torch ops on the device): the ``N = T * k`` (token, slot) pairs, numbered
   ``p = t * k + j``, sorted by expert (stable: token order within an expert), each expert's run padded to a
   multiple of BLOCK_M. ``sorted_pairs`` [cdiv(bound, BLOCK_M) * BLOCK_M] int32 holds pair ids, ``N`` in padding;
   ``block_experts`` [num_blocks] int32 the expert of each BLOCK_M block (``E`` past the end);
   ``num_padded`` [1] int32 the padded length actually used. ``bound = N + min(E, N) * (BLOCK_M - 1)``: only
   experts that got a pair pad, each by at most BLOCK_M - 1. Experts with no pair get no block at all.
2. ``_gate_up_kernel``: a grouped GEMM over those blocks. A program takes one block of BLOCK_M pairs (one
   expert) and BLOCK_N intermediate columns, gathers the pairs' rows of x, accumulates the gate and the up
   tile together (fp32) and writes ``silu(g) * u`` (fp32) to ``act`` [N, I] at the pair's row, rounded once to
   x's dtype (the reference's rounding: the activation enters the down projection in x's dtype).
3. ``_down_kernel``: the same grouping over ``act`` and w2; the epilogue multiplies each row by its pair's
   top-k weight (fp32) and stores fp32 rows into ``buf`` [N, H]. ``out = buf.view(T, k, H).sum(1)``: the k
   slots of a token are added in slot order, no atomics, the same bits on every run.

Quantized experts (``W_BITS`` 8 or 4, per projection): the B tiles are dequantized as they load, ``q * scale +
min`` in fp32 from the stacked weight-only format (int8 codes, or packed int4: byte ``k // 2``, low nibble for even
k; fp32 scales / mins [E, N, K // GROUP]), then enter the dot in x's dtype; only the active experts' codes are
read.

Rows, columns and K are masked, so H and I need not be multiples of the blocks. Programs whose block lies past
``num_padded`` return at once (the grid is sized by the bound). Block sizes come from :func:`moe_config` (no
``@triton.autotune``: the interpreter cannot run it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl


@triton.jit
def _load_b(w_ptr, s_ptr, m_ptr, expert, rows, kk, mask, stride_we, stride_wn, stride_se, stride_sn,
            W_BITS: tl.constexpr, GROUP: tl.constexpr, HAS_MINS: tl.constexpr, DTYPE: tl.constexpr):
    """The [BK, BN] weight tile ``w[expert, rows, kk]`` (rows [1, BN], kk [BK, 1]) in DTYPE: loaded as is (float
    weights, W_BITS 0) or dequantized in fp32 (q * scale + min) from int8 / packed int4 codes."""
    if W_BITS == 0:
        return tl.load(w_ptr + expert * stride_we + rows * stride_wn + kk, mask=mask, other=0.0)
    if W_BITS == 8:
        q = tl.load(w_ptr + expert * stride_we + rows * stride_wn + kk, mask=mask, other=0).to(tl.float32)
    else:
        byte = tl.load(w_ptr + expert * stride_we + rows * stride_wn + kk // 2, mask=mask, other=0).to(tl.int32)
        q = ((byte >> ((kk % 2) * 4)) & 15).to(tl.float32)
    g = expert * stride_se + rows * stride_sn + kk // GROUP  # [BK, BN] offsets into scales / mins
    w = q * tl.load(s_ptr + g, mask=mask, other=0.0)
    if HAS_MINS:
        w += tl.load(m_ptr + g, mask=mask, other=0.0)
    return w.to(DTYPE)


@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, s_ptr, m_ptr, act_ptr, pairs_ptr, experts_ptr, npad_ptr,
    num_pairs, K, INTER, top_k, stride_xt, stride_we, stride_wn, stride_se, stride_sn, stride_at,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    W_BITS: tl.constexpr = 0, GROUP: tl.constexpr = 1, HAS_MINS: tl.constexpr = False,
):
    """Grid (num_blocks, cdiv(INTER, BLOCK_N)): act[p, n] = silu(x[t] . w13[e, n]) * (x[t] . w13[e, INTER + n])
    for the block's pairs p (token t = p // top_k) and columns n."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(npad_ptr):
        return
    expert = tl.load(experts_ptr + pid_m).to(tl.int64)
    pair = tl.load(pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BM] (num_pairs: padding)
    m_ok = pair < num_pairs
    token = (pair // top_k).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < INTER
    x_rows = x_ptr + token[:, None] * stride_xt  # [BM, 1]
    gate_rows = offs_n.to(tl.int64)[None, :]  # [1, BN]
    up_rows = gate_rows + INTER
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < K
        a = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        w_ok = k_ok[:, None] & n_ok[None, :]
        bg = _load_b(w_ptr, s_ptr, m_ptr, expert, gate_rows, kk[:, None], w_ok, stride_we, stride_wn, stride_se,
                     stride_sn, W_BITS, GROUP, HAS_MINS, a.dtype)  # [BK, BN]
        bu = _load_b(w_ptr, s_ptr, m_ptr, expert, up_rows, kk[:, None], w_ok, stride_we, stride_wn, stride_se,
                     stride_sn, W_BITS, GROUP, HAS_MINS, a.dtype)
        acc_g = tl.dot(a, bg, acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(a, bu, acc_u, input_precision=DOT_PRECISION)
    h = (acc_g / (1.0 + tl.exp(-acc_g)) * acc_u).to(act_ptr.dtype.element_ty)  # fp32, rounded once
    out = act_ptr + pair.to(tl.int64)[:, None] * stride_at + offs_n[None, :]
    tl.store(out, h, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(
    act_ptr, w_ptr, s_ptr, m_ptr, tw_ptr, buf_ptr, pairs_ptr, experts_ptr, npad_ptr,
    num_pairs, K, N, stride_at, stride_we, stride_wn, stride_se, stride_sn, stride_bt,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    W_BITS: tl.constexpr = 0, GROUP: tl.constexpr = 1, HAS_MINS: tl.constexpr = False,
):
    """Grid (num_blocks, cdiv(H, BLOCK_N)): buf[p, n] = topk_weight[p] * (act[p] . w2[e, n]) in fp32."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(npad_ptr):
        return
    expert = tl.load(experts_ptr + pid_m).to(tl.int64)
    pair = tl.load(pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BM]
    m_ok = pair < num_pairs
    rows = pair.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    a_rows = act_ptr + rows[:, None] * stride_at  # [BM, 1]
    w_rows = offs_n.to(tl.int64)[None, :]  # [1, BN]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < K
        a = tl.load(a_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        b = _load_b(w_ptr, s_ptr, m_ptr, expert, w_rows, kk[:, None], k_ok[:, None] & n_ok[None, :], stride_we,
                    stride_wn, stride_se, stride_sn, W_BITS, GROUP, HAS_MINS, a.dtype)  # [BK, BN]
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    weight = tl.load(tw_ptr + rows, mask=m_ok, other=0.0)  # [BM] fp32
    acc = acc * weight[:, None]
    tl.store(buf_ptr + rows[:, None] * stride_bt + offs_n[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------------------------- launchers


@dataclass(frozen=True)
class MoEConfig:
    """Launch parameters of both grouped GEMMs (the same BLOCK_M: they share one alignment)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def moe_config(num_pairs: int, num_experts: int, dtype: torch.dtype, device: torch.device,
               quantized: bool = False) -> MoEConfig:
    """BLOCK_M from the mean number of pairs per expert (16 for decode: a block is mostly padding, the weight
    tile is what costs); small tiles under the interpreter and for fp32 (a correctness path on GPUs); quantized
    experts (codes plus a scale per weight in flight) take 64 x 64 tiles in 2 stages, within shared memory."""
    if device.type != "cuda":
        return MoEConfig(16, 32, 32, 4, 1)
    per_expert = num_pairs / max(num_experts, 1)
    bm = 16 if per_expert <= 16 else 32 if per_expert <= 48 else 64
    if dtype == torch.float32:
        return MoEConfig(bm, 32, 32, 4, 2)
    if quantized:
        return MoEConfig(bm, 64, 64, 4, 2)
    if bm == 16:
        return MoEConfig(16, 64, 128, 4, 3)
    return MoEConfig(bm, 64, 64, 4, 4)


@dataclass(frozen=True)
class ExpertFormat:
    """How one stacked projection [E, N, K] is stored: float (bits 0) or int8 / packed int4 codes with fp32
    scales (and mins) [E, N, K // group]."""

    bits: int
    group: int
    scales: torch.Tensor | None
    mins: torch.Tensor | None


def _expert_format(name: str, w: torch.Tensor, scales: torch.Tensor | None, mins: torch.Tensor | None,
                   x: torch.Tensor, e: int, n: int, k: int) -> ExpertFormat:
    assert w.dim() == 3 and w.is_contiguous(), f"{name} must be a contiguous [E, N, K], got {tuple(w.shape)}"
    assert w.device == x.device, f"{name} on {w.device}, x on {x.device}"
    if scales is None:
        assert mins is None, f"{name}: mins without scales"
        assert w.dtype == x.dtype, f"{name} {w.dtype} must be x's {x.dtype}"
        assert tuple(w.shape) == (e, n, k), f"{name} must be [{e}, {n}, {k}], got {tuple(w.shape)}"
        return ExpertFormat(0, 1, None, None)
    assert w.dtype in (torch.int8, torch.uint8), f"quantized {name} must be int8 / uint8 (int4), got {w.dtype}"
    bits = 8 if w.dtype == torch.int8 else 4
    assert tuple(w.shape) == (e, n, k if bits == 8 else k // 2) and (bits == 8 or k % 2 == 0), \
        f"quantized {name} must be [{e}, {n}, {k if bits == 8 else k // 2}], got {tuple(w.shape)}"
    groups = scales.shape[-1]
    for part, u in (("scales", scales), ("mins", mins)):
        if u is None:
            continue
        assert u.dtype == torch.float32 and u.is_contiguous() and u.device == x.device, \
            f"{name} {part} must be contiguous fp32 on {x.device}"
        assert u.dim() == 3 and tuple(u.shape) == (e, n, groups) and k % groups == 0, \
            f"{name} {part} must be [{e}, {n}, groups dividing {k}], got {tuple(u.shape)}"
    return ExpertFormat(bits, k // groups, scales, mins)


def check_fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                    topk_ids: torch.Tensor, w13_scales: torch.Tensor | None = None,
                    w13_mins: torch.Tensor | None = None, w2_scales: torch.Tensor | None = None,
                    w2_mins: torch.Tensor | None = None) -> tuple[int, int, int, int, int]:
    """(T, H, E, I, k) after asserting devices, dtypes, shapes and contiguity (metadata only)."""
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported x dtype {x.dtype}"
    assert x.dim() == 2 and x.is_contiguous(), f"x must be a contiguous [T, H], got {tuple(x.shape)}"
    t, h = x.shape
    assert w13.dim() == 3 and w13.shape[1] % 2 == 0, f"w13 must be [E, 2*I, {h}], got {tuple(w13.shape)}"
    e, i = w13.shape[0], w13.shape[1] // 2
    _expert_format("w13", w13, w13_scales, w13_mins, x, e, 2 * i, h)
    _expert_format("w2", w2, w2_scales, w2_mins, x, e, h, i)
    assert topk_ids.dim() == 2 and topk_ids.shape[0] == t, f"topk_ids must be [{t}, k], got {tuple(topk_ids.shape)}"
    assert topk_ids.dtype in (torch.int32, torch.int64), f"topk_ids must be int32/int64, got {topk_ids.dtype}"
    k = topk_ids.shape[1]
    assert tuple(topk_weights.shape) == (t, k), f"topk_weights must be [{t}, {k}], got {tuple(topk_weights.shape)}"
    assert topk_weights.dtype == torch.float32, f"topk_weights must be float32, got {topk_weights.dtype}"
    for name, u in (("topk_weights", topk_weights), ("topk_ids", topk_ids)):
        assert u.device == x.device, f"{name} on {u.device}, x on {x.device}"
    return t, h, e, i, k


def padded_bound(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Length of ``sorted_pairs``: a multiple of ``block_m`` that holds every expert's run padded to one."""
    bound = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return triton.cdiv(bound, block_m) * block_m


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted_pairs, block_experts, num_padded) as described in the module docstring; device ops only.
    Ids outside [0, E) are the caller's bug (they index the counts out of range)."""
    flat = topk_ids.reshape(-1).to(torch.int64)  # [N] expert of pair p
    n, dev = flat.numel(), flat.device
    length = padded_bound(n, num_experts, block_m)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    padded_end = torch.cumsum(padded, 0)  # [E]
    expert_of, order = torch.sort(flat, stable=True)  # [N] pair ids by expert, token order within one
    first = (torch.cumsum(counts, 0) - counts).index_select(0, expert_of)  # first sorted index of its expert
    dest = (padded_end - padded).index_select(0, expert_of) + torch.arange(n, device=dev) - first  # [N]
    sorted_pairs = torch.full((length,), n, dtype=torch.int32, device=dev).scatter_(0, dest, order.to(torch.int32))
    block_start = torch.arange(0, length, block_m, device=dev)  # [num_blocks]
    block_experts = torch.searchsorted(padded_end, block_start, right=True).to(torch.int32)  # E past the end
    return sorted_pairs, block_experts, padded_end.narrow(0, num_experts - 1, 1).to(torch.int32)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products (no TF32), like the reference."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _quant_args(w: torch.Tensor, f: ExpertFormat) -> tuple[Any, ...]:
    """(scales, mins, scale stride over experts, over rows) and the constexprs of one projection."""
    s = f.scales if f.scales is not None else w  # any pointer: not read for float weights
    m = f.mins if f.mins is not None else s
    return (s, m, s.stride(0), s.stride(1)), dict(W_BITS=f.bits, GROUP=f.group, HAS_MINS=f.mins is not None)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, w13_scales: torch.Tensor | None = None, w13_mins: torch.Tensor | None = None,
              w2_scales: torch.Tensor | None = None, w2_mins: torch.Tensor | None = None,
              config: MoEConfig | None = None) -> torch.Tensor:
    """``out`` [T, H] in x's dtype: the semantics of :func:`fastinfer.ops.reference.fused_moe` (float or int8 /
    int4 experts). ``config`` forces the block sizes (tests, benchmarks); by default :func:`moe_config`."""
    t, h, e, i, k = check_fused_moe(x, w13, w2, topk_weights, topk_ids, w13_scales, w13_mins, w2_scales, w2_mins)
    n = t * k
    if n == 0 or h == 0 or i == 0:
        return x.new_zeros(t, h)
    (s13, m13, se13, sn13), c13 = _quant_args(w13, _expert_format("w13", w13, w13_scales, w13_mins, x, e, 2 * i, h))
    (s2, m2, se2, sn2), c2 = _quant_args(w2, _expert_format("w2", w2, w2_scales, w2_mins, x, e, h, i))
    cfg = config or moe_config(n, e, x.dtype, x.device, quantized=c13["W_BITS"] > 0 or c2["W_BITS"] > 0)
    sorted_pairs, block_experts, num_padded = moe_align(topk_ids, e, cfg.block_m)
    num_blocks = block_experts.numel()
    act = torch.empty(n, i, dtype=x.dtype, device=x.device)  # [N, I] pair rows
    buf = torch.empty(n, h, dtype=torch.float32, device=x.device)  # [N, H] weighted expert outputs
    prec = _dot_precision(x.dtype)
    _gate_up_kernel[(num_blocks, triton.cdiv(i, cfg.block_n))](
        x, w13, s13, m13, act, sorted_pairs, block_experts, num_padded, n, h, i, k,
        x.stride(0), w13.stride(0), w13.stride(1), se13, sn13, act.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, DOT_PRECISION=prec,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **c13,
    )
    tw = topk_weights.reshape(-1)  # [N], pair p = t * k + j
    if not tw.is_contiguous():
        tw = tw.contiguous()
    _down_kernel[(num_blocks, triton.cdiv(h, cfg.block_n))](
        act, w2, s2, m2, tw, buf, sorted_pairs, block_experts, num_padded, n, i, h,
        act.stride(0), w2.stride(0), w2.stride(1), se2, sn2, buf.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, DOT_PRECISION=prec,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **c2,
    )
    return buf.view(t, k, h).sum(1).to(x.dtype)


__all__ = ["fused_moe", "check_fused_moe", "moe_align", "moe_config", "padded_bound", "MoEConfig", "ExpertFormat"]
