"""Paged attention in Triton: a varlen prefill kernel (flash attention over the paged cache) and a GQA-aware
split-KV decode kernel (flash-decoding) with its reduction kernel.

Both kernels read keys and values through the block table one key position at a time
(``cache[block_table[seq, pos // block_size], pos % block_size]``), so any block size and any
non-contiguous block ids work. Keys at positions ``>= seq_len`` (and outside the tile's visible range) are
never loaded: masked loads return zeros, so stale or NaN cache slots cannot leak into the output.

Softmax runs online in fp32 in the log2 domain (``exp2`` with ``scale * log2(e)`` folded into the scores);
with ``softcap`` (Gemma 2) the scores are capped first, ``softcap * tanh(score / softcap)`` (the cap in the log2
domain too, tanh from exp2).
Both kernels put the ``G = H / Hkv`` query heads of one KV head into the rows of one tile, so each key and
value block is loaded once per KV head (GQA / MQA); in prefill, a tile holds ``BLOCK_M // G`` query tokens
times ``G`` heads.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastinfer.ops.metadata import AttentionMetadata

_LOG2E = 1.4426950408889634
# Running max before any key is seen. Finite, so a tile whose keys are all masked for a row keeps
# ``exp2(m_old - m_new) == 1`` instead of producing NaN from ``-inf - -inf``.
_NEG_BIG = tl.constexpr(-1.0e30)
_TWO_LOG2E = tl.constexpr(2.0 * _LOG2E)


@triton.jit
def _load_rows(ptr, row, n_ok, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr):
    """Rows ``row`` [N] (element offsets) of a cache as [N, BLOCK_D]; zeros where masked or padded."""
    ptrs = ptr + row[:, None] + offs_d[None, :]
    if MASKED:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs, mask=n_ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=n_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return x



@triton.jit
def _load_quant_rows(ptr, row, n_ok, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
                     KV_QUANT: tl.constexpr, DTYPE: tl.constexpr):
    """Rows of a quantized cache (``[..., D + 2]`` bytes: D codes, then the row's fp16 scale): the codes as
    ``DTYPE`` [N, BLOCK_D] (exact: int8 and e4m3 values fit fp16 / bf16) and the scales as fp32 [N], zeros where
    masked. The caller multiplies the scales in after the dot products, so no dequantised copy exists."""
    codes = _load_rows(ptr, row, n_ok, offs_d, HEAD_DIM, BLOCK_D, MASKED)
    if KV_QUANT == 2:  # fp8 e4m3 bits in uint8
        codes = codes.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    scale_ptr = (ptr + row + HEAD_DIM).to(tl.pointer_type(tl.float16))
    if MASKED:
        scale = tl.load(scale_ptr, mask=n_ok, other=0.0)
    else:
        scale = tl.load(scale_ptr)
    return codes.to(DTYPE), scale.to(tl.float32)


@triton.jit
def _attend_tiles(
    q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table_row, kv_head, pos, base, hi, window, j_lo, j_hi,
    scale_log2, softcap_log2, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr, KV_QUANT: tl.constexpr,
):
    """Online softmax of q [M, D] over key tiles ``j_lo .. j_hi - 1``; tile j holds positions
    ``base + j * BLOCK_N + [0, BLOCK_N)``, gathered through the block table. Unmasked tiles must be fully
    visible to every row; MASKED tiles skip keys ``>= hi`` (never loaded) and, with CAUSAL / USE_WINDOW, score
    keys after a row's position ``pos`` [M] or outside its window as -inf."""
    offs_d = tl.arange(0, BLOCK_D)
    for j in range(j_lo, j_hi):
        offs_n = base + j * BLOCK_N + tl.arange(0, BLOCK_N)  # [N] key positions
        n_ok = offs_n < hi
        if MASKED:
            blk = tl.load(table_row + offs_n // PAGE, mask=n_ok, other=0).to(tl.int64)
        else:
            blk = tl.load(table_row + offs_n // PAGE).to(tl.int64)
        k_row = blk * stride_kb + (offs_n % PAGE) * stride_ks + kv_head * stride_kh
        v_row = blk * stride_vb + (offs_n % PAGE) * stride_vs + kv_head * stride_vh
        if KV_QUANT == 0:
            k = _load_rows(k_cache_ptr, k_row, n_ok, offs_d, HEAD_DIM, BLOCK_D, MASKED)  # [N, D]
            v = _load_rows(v_cache_ptr, v_row, n_ok, offs_d, HEAD_DIM, BLOCK_D, MASKED)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [M, N]
        else:  # codes in the dots, each key's scale on its score column, each value's on its p column
            k, k_scale = _load_quant_rows(k_cache_ptr, k_row, n_ok, offs_d, HEAD_DIM, BLOCK_D, MASKED, KV_QUANT,
                                          q.dtype)
            v, v_scale = _load_quant_rows(v_cache_ptr, v_row, n_ok, offs_d, HEAD_DIM, BLOCK_D, MASKED, KV_QUANT,
                                          q.dtype)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * (k_scale * scale_log2)[None, :]
        if SOFTCAP:  # c tanh(s / c) = c (1 - 2 / (e^(2 s / c) + 1)): +-c at the extremes, never NaN
            s = softcap_log2 * (1.0 - 2.0 / (tl.exp2(s * (_TWO_LOG2E / softcap_log2)) + 1.0))
        if MASKED:
            visible = n_ok[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= pos[:, None])
            if USE_WINDOW:
                visible = visible & (offs_n[None, :] > pos[:, None] - window)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])  # masked keys: exp2(-inf) == 0
        l_i = l_i * alpha + tl.sum(p, 1)
        if KV_QUANT != 0:
            p = p * v_scale[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    query_start_loc_ptr, seq_lens_ptr, block_table_ptr,
    seq_offset, scale_log2, softcap_log2, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr, TOKENS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, USE_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr, KV_QUANT: tl.constexpr = 0,
):
    """Grid (query tiles, sequences, KV heads). Row r of a tile is query token ``tile * TOKENS + r // GROUP``
    of head ``kv_head * GROUP + r % GROUP``. Tiles run last-first: the late ones see the most keys, so they
    start early and the short ones fill the tail."""
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    seq = tl.program_id(1) + seq_offset
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if tile * TOKENS >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx = seq_len - q_len  # position of the sequence's first query token

    rows = tl.arange(0, BLOCK_M)
    tok = tile * TOKENS + rows // GROUP  # [M] query index within the sequence
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < TOKENS * GROUP) & (tok < q_len)
    pos = ctx + tok  # [M] absolute position of each row's query
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_off = (q_start + tok).to(tl.int64) * stride_qt + head * stride_qh  # [M]
    q = tl.load(q_ptr + q_off[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # Keys [lo, hi) are visible to some row of this tile (causal block skipping above, the window below).
    # Tiles of keys visible to every row run without masks: [j_win, j_full); the others are masked.
    first_pos = ctx + tile * TOKENS
    hi = tl.minimum(first_pos + TOKENS, seq_len)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(first_pos - window + 1, 0)
    n_tiles = tl.cdiv(hi - lo, BLOCK_N)
    j_full = (first_pos + 1 - lo) // BLOCK_N  # tiles entirely at or before the first row's position
    j_win = 0
    if USE_WINDOW:  # tiles entirely inside the last row's window
        j_win = tl.minimum(tl.cdiv(tl.maximum(hi - window - lo, 0), BLOCK_N), n_tiles)
        j_full = tl.maximum(j_full, j_win)

    m_i = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table_row = block_table_ptr + seq.to(tl.int64) * stride_bt
    strides = (stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh)
    if USE_WINDOW:
        m_i, l_i, acc = _attend_tiles(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table_row, kv_head, pos, lo, hi,
                                      window, 0, j_win, scale_log2, softcap_log2, *strides, HEAD_DIM, BLOCK_D, BLOCK_N,
                                      PAGE, True, True, True, DOT_PRECISION, SOFTCAP, KV_QUANT)
    m_i, l_i, acc = _attend_tiles(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table_row, kv_head, pos, lo, hi,
                                  window, j_win, j_full, scale_log2, softcap_log2, *strides, HEAD_DIM, BLOCK_D, BLOCK_N,
                                  PAGE, False, False, False, DOT_PRECISION, SOFTCAP, KV_QUANT)
    m_i, l_i, acc = _attend_tiles(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table_row, kv_head, pos, lo, hi,
                                  window, j_full, n_tiles, scale_log2, softcap_log2, *strides, HEAD_DIM, BLOCK_D,
                                  BLOCK_N, PAGE, True, True, USE_WINDOW, DOT_PRECISION, SOFTCAP, KV_QUANT)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_off = (q_start + tok).to(tl.int64) * stride_ot + head * stride_oh
    tl.store(out_ptr + o_off[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
    seq_lens_ptr, block_table_ptr, scale_log2, softcap_log2, window, split_len, num_heads, num_splits,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, USE_WINDOW: tl.constexpr, SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr, KV_QUANT: tl.constexpr = 0,
):
    """Grid (sequences, KV heads, splits). One query token per sequence; the tile rows are the GROUP query
    heads of one KV head. With SPLIT each program covers ``split_len`` keys and writes an unnormalised
    partial result (acc, running max, running sum) for the reduction kernel."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    start = lo + split * split_len
    end = tl.minimum(start + split_len, seq_len)

    rows = tl.arange(0, BLOCK_G)
    head = kv_head * GROUP + rows
    g_ok = rows < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_off = seq.to(tl.int64) * stride_qt + head * stride_qh  # [G]
    q = tl.load(q_ptr + q_off[:, None] + offs_d[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_G], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table_row = block_table_ptr + seq.to(tl.int64) * stride_bt
    strides = (stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh)
    n_keys = tl.maximum(end - start, 0)
    full = n_keys // BLOCK_N  # whole tiles run unmasked, then one masked tail
    m_i, l_i, acc = _attend_tiles(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table_row, kv_head, rows, start, end,
                                  window, 0, full, scale_log2, softcap_log2, *strides, HEAD_DIM, BLOCK_D, BLOCK_N,
                                  PAGE, False, False, False, DOT_PRECISION, SOFTCAP, KV_QUANT)
    m_i, l_i, acc = _attend_tiles(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table_row, kv_head, rows, start, end,
                                  window, full, tl.cdiv(n_keys, BLOCK_N), scale_log2, softcap_log2, *strides, HEAD_DIM,
                                  BLOCK_D, BLOCK_N, PAGE, True, False, False, DOT_PRECISION, SOFTCAP, KV_QUANT)

    mask = g_ok[:, None] & d_ok[None, :]
    if not SPLIT:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_off = seq.to(tl.int64) * stride_ot + head * stride_oh
        tl.store(out_ptr + o_off[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        part = (seq.to(tl.int64) * num_heads + head) * num_splits + split  # [G] index into [B, H, S]
        tl.store(part_m_ptr + part, m_i, mask=g_ok)
        tl.store(part_l_ptr + part, l_i, mask=g_ok)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=mask)


@triton.jit
def _decode_reduce_kernel(
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, num_heads, num_splits, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Grid (sequences, query heads): merge the split partials (log-sum-exp weights) and normalise."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    base = (seq.to(tl.int64) * num_heads + head) * num_splits
    m = tl.load(part_m_ptr + base + offs_s, mask=s_ok, other=float("-inf"))  # [S]
    l_s = tl.load(part_l_ptr + base + offs_s, mask=s_ok, other=0.0)
    acc = tl.load(part_acc_ptr + (base + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                  mask=s_ok[:, None] & d_ok[None, :], other=0.0)  # [S, D]
    w = tl.exp2(m - tl.max(m, 0))  # empty splits kept the finite -1e30 max: weight 0
    total = tl.sum(w * l_s, 0)
    out = tl.sum(acc * w[:, None], 0) / total
    tl.store(out_ptr + seq.to(tl.int64) * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=d_ok)


# ----------------------------------------------------------------------------------------------- launchers


def _block_d(head_dim: int) -> int:
    """Head dim padded to a power of two (>= 16, the smallest tl.dot operand)."""
    return max(16, triton.next_power_of_2(head_dim))


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products (no TF32) so fp32 runs match the torch backend."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def kv_quant_kind(cache: torch.Tensor) -> int:
    """0 for a float cache, 1 for int8 KV (``torch.int8`` rows of D codes + an fp16 scale), 2 for fp8 e4m3 KV
    (``torch.uint8`` rows holding e4m3 bits + an fp16 scale): the kernels' ``KV_QUANT``."""
    if cache.dtype == torch.int8:
        return 1
    if cache.dtype == torch.uint8:
        return 2
    return 0


def check_attention_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_table: torch.Tensor, seq_lens: torch.Tensor,
                           query_start_loc: torch.Tensor | None = None) -> None:
    """Shapes, dtypes, strides and devices of the attention launchers' inputs (metadata only: the fake
    implementation of the custom op runs it too)."""
    assert q.dim() == 3 and k_cache.dim() == 4, "q [T, H, D], caches [num_blocks, block_size, Hkv, D]"
    assert k_cache.shape == v_cache.shape, f"k/v cache shapes differ: {k_cache.shape} vs {v_cache.shape}"
    quant = kv_quant_kind(k_cache)
    row = q.shape[2] + (2 if quant else 0)  # a quantized row: D codes, then its fp16 scale
    assert k_cache.shape[3] == row, \
        f"head dim {q.shape[2]}: cache rows must have {row} elements, not {k_cache.shape[3]}"
    assert q.shape[1] % k_cache.shape[2] == 0, f"{q.shape[1]} query heads not a multiple of {k_cache.shape[2]}"
    assert k_cache.dtype == v_cache.dtype, f"k / v cache dtypes differ: {k_cache.dtype} vs {v_cache.dtype}"
    assert quant or q.dtype == k_cache.dtype, f"dtypes differ: q {q.dtype}, cache {k_cache.dtype}"
    assert q.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported dtype {q.dtype}"
    assert not quant or q.shape[2] % 2 == 0, f"a quantized cache needs an even head dim, not {q.shape[2]}"
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1, "head dim must be contiguous"
    assert block_table.dim() == 2 and block_table.shape[0] >= seq_lens.shape[0], "block_table must be [B, max_blocks]"
    assert block_table.dtype == torch.int32 and block_table.stride(1) == 1, "block_table must be int32, rows dense"
    assert seq_lens.dtype == torch.int32 and seq_lens.is_contiguous(), "seq_lens must be contiguous int32"
    tensors = [q, k_cache, v_cache, block_table, seq_lens]
    if query_start_loc is not None:
        assert query_start_loc.dtype == torch.int32 and query_start_loc.is_contiguous(), \
            "query_start_loc must be contiguous int32"
        assert query_start_loc.dim() == 1 and query_start_loc.shape[0] > seq_lens.shape[0], \
            "query_start_loc must be [B + 1]"
        tensors.append(query_start_loc)
    assert len({t.device for t in tensors}) == 1, \
        f"tensors on different devices: {[str(t.device) for t in tensors]}"


def _cache_strides(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, ...]:
    return (*k_cache.stride()[:3], *v_cache.stride()[:3])


def _prefill_config(head_dim: int, group: int, dtype: torch.dtype, on_gpu: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Chosen from sm_90 compiles (ptxas register / spill reports):
    no spills for bf16/fp16 at head dims 64-256 with GQA 1-8; fp32 (a correctness path on GPU) gets small
    tiles that fit shared memory. Small tiles under the CPU interpreter."""
    if not on_gpu:
        block_m, block_n, warps, stages = 32, 32, 4, 1
    elif dtype == torch.float32:
        block_m, block_n, warps, stages = (64, 32, 8, 2) if head_dim <= 128 else (32, 32, 4, 1)
    elif head_dim <= 64:
        block_m, block_n, warps, stages = 128, 64, 8, 3
    elif head_dim <= 128:
        block_m, block_n, warps, stages = 128, 64, 8, 2
    else:
        block_m, block_n, warps, stages = 64, 32, 8, 2
    return max(block_m, triton.next_power_of_2(group)), block_n, warps, stages


def _decode_config(head_dim: int, on_gpu: bool) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of the decode kernel (no spills on sm_90 at head dim <= 128)."""
    if not on_gpu:
        return 32, 4, 1
    return (64, 4, 3) if head_dim <= 128 else (32, 4, 2)


def paged_prefill_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                         meta: AttentionMetadata, scale: float, sliding_window: int | None = None,
                         first_seq: int = 0, softcap: float | None = None) -> None:
    """Varlen causal flash attention of sequences ``first_seq..`` of ``meta`` over the paged cache, written into
    ``out`` [T, H, D] at the rows given by ``meta.query_start_loc``. Any query lengths (prefill, chunked
    prefill with earlier context, decode rows) are valid."""
    paged_prefill_varlen(q, k_cache, v_cache, out, meta.query_start_loc, meta.seq_lens, meta.block_table,
                         max(meta.query_lens_cpu[first_seq:], default=0), scale, sliding_window, first_seq, softcap)


def paged_prefill_varlen(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                         query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
                         max_query_len: int, scale: float, sliding_window: int | None = None,
                         first_seq: int = 0, softcap: float | None = None) -> None:
    """:func:`paged_prefill_triton` on the metadata tensors: sequences ``first_seq .. B - 1`` (B =
    ``seq_lens.shape[0]``); ``max_query_len`` (a host int, the longest of their query lengths) sizes the grid."""
    check_attention_inputs(q, k_cache, v_cache, block_table, seq_lens, query_start_loc)
    assert out.shape == q.shape and out.stride(2) == 1, "out must match q [T, H, D]"
    num_seqs = seq_lens.shape[0] - first_seq
    if num_seqs <= 0 or max_query_len <= 0:
        return
    _, num_heads, head_dim = q.shape
    num_kv = k_cache.shape[2]
    group = num_heads // num_kv
    block_m, block_n, warps, stages = _prefill_config(head_dim, group, q.dtype, q.is_cuda)
    tokens = block_m // group  # query tokens per tile
    grid = (triton.cdiv(max_query_len, tokens), num_seqs, num_kv)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, query_start_loc, seq_lens, block_table,
        first_seq, scale * _LOG2E, (softcap or 1.0) * _LOG2E, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *_cache_strides(k_cache, v_cache), block_table.stride(0),
        HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), GROUP=group, TOKENS=tokens,
        BLOCK_M=block_m, BLOCK_N=block_n, PAGE=k_cache.shape[1], USE_WINDOW=sliding_window is not None,
        DOT_PRECISION=_dot_precision(q.dtype), SOFTCAP=softcap is not None, KV_QUANT=kv_quant_kind(k_cache),
        num_warps=warps, num_stages=stages,
    )


def _decode_splits(num_seqs: int, num_kv: int, max_keys: int, block_n: int, device: torch.device) -> int:
    """Enough programs to fill the GPU (about two per SM), but at least 256 keys per split."""
    if device.type != "cuda":
        return 1
    programs = num_seqs * num_kv
    target = 2 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= target:
        return 1
    return max(1, min(triton.cdiv(target, programs), triton.cdiv(max_keys, max(256, block_n)), 64))


def paged_decode_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                        block_table: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int, scale: float,
                        sliding_window: int | None = None, num_splits: int | None = None,
                        softcap: float | None = None) -> None:
    """Decode attention: one query per sequence, ``q`` and ``out`` [B, H, D], row i attends to the first
    ``seq_lens[i]`` cached positions of ``block_table[i]`` (the last ``sliding_window`` of them with a window).
    ``max_seq_len`` (a host int) sizes the splits; ``num_splits`` overrides the split-KV heuristic
    (1 = one pass, no reduction kernel)."""
    check_attention_inputs(q, k_cache, v_cache, block_table, seq_lens)
    assert out.shape == q.shape and out.stride(2) == 1, "out must match q [B, H, D]"
    num_seqs, num_heads, head_dim = q.shape
    assert block_table.shape[0] >= num_seqs and seq_lens.shape[0] >= num_seqs, "fewer table rows than queries"
    if num_seqs == 0:
        return
    num_kv = k_cache.shape[2]
    group = num_heads // num_kv
    block_d = _block_d(head_dim)
    block_n, warps, stages = _decode_config(head_dim, q.is_cuda)
    max_keys = max_seq_len if sliding_window is None else min(max_seq_len, sliding_window)
    splits = num_splits or _decode_splits(num_seqs, num_kv, max_keys, block_n, q.device)
    split_len = triton.cdiv(triton.cdiv(max(max_keys, 1), splits), block_n) * block_n
    if splits > 1:
        part_acc = torch.empty(num_seqs, num_heads, splits, head_dim, dtype=torch.float32, device=q.device)
        part_m = torch.empty(num_seqs, num_heads, splits, dtype=torch.float32, device=q.device)  # [B, H, S]
        part_l = torch.empty_like(part_m)
    else:
        part_acc = part_m = part_l = out  # unused
    _decode_kernel[(num_seqs, num_kv, splits)](
        q, k_cache, v_cache, out, part_acc, part_m, part_l, seq_lens, block_table,
        scale * _LOG2E, (softcap or 1.0) * _LOG2E, sliding_window or 0, split_len, num_heads, splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *_cache_strides(k_cache, v_cache), block_table.stride(0),
        HEAD_DIM=head_dim, BLOCK_D=block_d, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n, PAGE=k_cache.shape[1], USE_WINDOW=sliding_window is not None, SPLIT=splits > 1,
        DOT_PRECISION=_dot_precision(q.dtype), SOFTCAP=softcap is not None, KV_QUANT=kv_quant_kind(k_cache),
        num_warps=warps, num_stages=stages,
    )
    if splits > 1:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            out, part_acc, part_m, part_l, num_heads, splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(splits),
            num_warps=4 if block_d >= 128 else 2,
        )


def paged_attention_varlen(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                           block_table: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                           num_decodes: int, max_decode_seq_len: int, max_prefill_query_len: int, scale: float,
                           sliding_window: int | None = None, softcap: float | None = None) -> None:
    """Causal attention of packed queries ``q`` [T, H, D] over the paged caches [num_blocks, block_size, Hkv, D]
    into ``out`` [T, H, D]: the semantics of :func:`fastinfer.ops.reference.paged_attention`, on the metadata
    tensors plus host ints. The ``num_decodes`` leading decode rows (their longest context
    ``max_decode_seq_len``) go to the split-KV decode kernel, the other sequences (their longest query
    ``max_prefill_query_len``) to the varlen prefill kernel."""
    nd = num_decodes
    if nd:
        paged_decode_triton(q.narrow(0, 0, nd), k_cache, v_cache, out.narrow(0, 0, nd), block_table, seq_lens,
                            max_decode_seq_len, scale, sliding_window, softcap=softcap)
    if nd < seq_lens.shape[0]:
        paged_prefill_varlen(q, k_cache, v_cache, out, query_start_loc, seq_lens, block_table,
                             max_prefill_query_len, scale, sliding_window, first_seq=nd, softcap=softcap)


def attention_flops(meta: AttentionMetadata, num_heads: int, head_dim: int, sliding_window: int | None = None
                    ) -> float:
    """Useful (causal, windowed) FLOPs of one paged_attention call: 4 * D per visible (query, key) pair."""

    def visible_upto(n: int) -> int:  # sum of min(x, window) for x = 1..n
        w = sliding_window or n
        return n * (n + 1) // 2 if n <= w else w * (w + 1) // 2 + (n - w) * w

    pairs = sum(visible_upto(s) - visible_upto(s - q) for q, s in zip(meta.query_lens_cpu, meta.seq_lens_cpu))
    return 4.0 * head_dim * num_heads * pairs


__all__ = ["kv_quant_kind", "paged_attention_varlen", "paged_prefill_triton", "paged_prefill_varlen",
           "paged_decode_triton", "check_attention_inputs", "attention_flops"]
