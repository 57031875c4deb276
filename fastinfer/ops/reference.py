"""Plain-PyTorch specification of every op: simple loops, fp32 math, exact slicing. Kernels and the fast
torch backend are tested against these functions; the engine never needs to call them."""
from __future__ import annotations

import torch

from fastinfer.ops.metadata import AttentionMetadata

KV_QMAX = {"int8": 127.0, "fp8_e4m3": 448.0}
KV_SCALE_MIN = 2.0 ** -14  # the smallest normal fp16
KV_SCALE_MAX = 65504.0  # the largest finite fp16


def kv_quant_dtype(cache: torch.Tensor) -> str | None:
    """The quantization of a KV cache, read from its dtype: a float cache is plain (None), ``torch.int8`` is
    int8 KV, ``torch.uint8`` is fp8 e4m3 KV (the bytes are ``torch.float8_e4m3fn`` bits)."""
    if cache.dtype.is_floating_point:
        return None
    kind = {torch.int8: "int8", torch.uint8: "fp8_e4m3"}.get(cache.dtype)
    if kind is None:
        raise ValueError(f"KV cache dtype {cache.dtype} is neither a float dtype, int8 nor uint8 (fp8 e4m3)")
    return kind


def quantize_kv_rows(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Quantize KV rows ``x`` [..., D] (one token's one KV head each) to cache rows [..., D + 2]: the spec.

    Symmetric, one scale per row, all in fp32: ``amax = max|x|`` over D (NaN elements ignored), ``scale =
    fp16(max(amax / QMAX, 2**-14))`` clamped to <= 65504, with QMAX 127 (``kind="int8"``) or 448
    (``"fp8_e4m3"``). The codes come from the fp16-ROUNDED scale: int8 ``clamp(round_half_even(x / scale), -127,
    127)``; fp8 ``(x / scale).clamp(-448, 448)`` cast to ``float8_e4m3fn`` (round to nearest even) and stored as
    its uint8 bits. A NaN element gives code 0, +-inf saturates to +-QMAX (and makes the row's scale 65504); a
    row with no finite element has scale 65504. So a scale is never 0, inf or NaN. Row layout: ``[..., :D]`` the
    codes, ``[..., D:]`` the scale as IEEE fp16, little endian. Dequantized value: ``code * scale`` in fp32
    (:func:`dequantize_kv`)."""
    if kind not in KV_QMAX:
        raise ValueError(f"unknown KV quantization {kind!r}; expected one of {sorted(KV_QMAX)}")
    x = x.float()
    qmax = KV_QMAX[kind]
    amax = torch.nan_to_num(x, nan=0.0).abs().amax(dim=-1, keepdim=True)
    amax = torch.where(torch.isfinite(x).any(dim=-1, keepdim=True), amax, torch.full_like(amax, float("inf")))
    scale16 = (amax / qmax).clamp(min=KV_SCALE_MIN).to(torch.float16).clamp(max=KV_SCALE_MAX)
    y = torch.nan_to_num(x / scale16.float(), nan=0.0).clamp(-qmax, qmax)
    if kind == "int8":
        codes = torch.round(y).to(torch.int8)
    else:
        codes = y.to(torch.float8_e4m3fn).view(torch.uint8)
    return torch.cat([codes, scale16.contiguous().view(codes.dtype)], dim=-1)


def dequantize_kv(cache: torch.Tensor) -> torch.Tensor:
    """Quantized cache rows [..., D + 2] (int8, or uint8 holding fp8 e4m3 bits) to fp32 values [..., D]:
    ``code * scale`` with the row's fp16 scale from its last two bytes (:func:`quantize_kv_rows`)."""
    kind = kv_quant_dtype(cache)
    if kind is None:
        raise ValueError(f"dequantize_kv needs an int8 or uint8 (fp8 e4m3) cache, got {cache.dtype}")
    codes = cache[..., :-2]
    values = codes.float() if kind == "int8" else codes.view(torch.float8_e4m3fn).float()
    scale = cache[..., -2:].contiguous().view(torch.float16).float()
    return values * scale


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write ``key``/``value`` [T, Hkv, D] into the caches [num_blocks, block_size, Hkv, D] at the flat
    slots ``slot_mapping`` [T]; negative slots are skipped (padding). A quantized cache (int8 / uint8, last dim
    D + 2, :func:`kv_quant_dtype`) stores each row as :func:`quantize_kv_rows` makes it."""
    bs = k_cache.shape[1]
    kind = kv_quant_dtype(k_cache)
    if kind is not None:
        key, value = quantize_kv_rows(key, kind), quantize_kv_rows(value, kind)
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        k_cache[slot // bs, slot % bs] = key[t]
        v_cache[slot // bs, slot % bs] = value[t]


def gather_kv(cache: torch.Tensor, blocks: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` positions of one sequence from the paged cache: [length, Hkv, D]."""
    bs = cache.shape[1]
    nb = -(-length // bs)
    return cache[blocks[:nb].long()].reshape(nb * bs, *cache.shape[2:])[:length]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Causal attention of packed queries ``q`` [T, H, D] over each sequence's paged context.

    Query ``r`` of sequence ``i`` sits at position ``p = seq_len - query_len + r`` and sees keys
    ``max(0, p - sliding_window + 1) .. p``. GQA: query head ``h`` reads KV head ``h // (H // Hkv)``.
    Scores are ``scale * q . k``, soft-capped to ``softcap * tanh(score / softcap)`` when ``softcap`` is given
    (Gemma 2), before the softmax. Quantized caches are read through :func:`dequantize_kv`.
    """
    out = torch.empty_like(q)
    num_heads, num_kv = q.shape[1], k_cache.shape[2]
    group = num_heads // num_kv
    qsl = meta.query_start_loc.tolist()
    for i, (qlen, slen) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        k = gather_kv(k_cache, meta.block_table[i], slen)  # [L, Hkv, D] (or D + 2 quantized)
        v = gather_kv(v_cache, meta.block_table[i], slen)
        k = k.float() if kv_quant_dtype(k) is None else dequantize_kv(k)
        v = v.float() if kv_quant_dtype(v) is None else dequantize_kv(v)
        k = k.repeat_interleave(group, dim=1)  # [L, H, D]
        v = v.repeat_interleave(group, dim=1)
        for r in range(qlen):
            p = slen - qlen + r
            lo = 0 if sliding_window is None else max(0, p - sliding_window + 1)
            qi = q[qsl[i] + r].float()  # [H, D]
            scores = torch.einsum("hd,lhd->hl", qi, k[lo:p + 1]) * scale  # [H, p+1-lo]
            if softcap is not None:
                scores = softcap * torch.tanh(scores / softcap)
            probs = torch.softmax(scores, dim=-1)
            out[qsl[i] + r] = torch.einsum("hl,lhd->hd", probs, v[lo:p + 1]).to(q.dtype)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32, scaled by ``weight`` after casting back (the HF Llama convention)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual += x`` then RMSNorm of the sum; returns (normed, new residual)."""
    s = residual + x
    return rms_norm(s, weight, eps), s


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX-style (rotate-half) rotary embedding. ``cos_sin_cache`` [max_pos, rot_dim] holds cos in its first
    half and sin in its second; q [T, H, D], k [T, Hkv, D] rotate their first ``rot_dim`` features."""
    rot = cos_sin_cache.shape[1]
    cos, sin = cos_sin_cache[positions.long()].chunk(2, dim=-1)  # [T, rot/2] each

    def apply(x: torch.Tensor) -> torch.Tensor:
        c, s = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
        x1, x2, rest = x[..., :rot // 2], x[..., rot // 2:rot], x[..., rot:]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], dim=-1)

    return apply(q), apply(k)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for x [..., 2d]."""
    d = x.shape[-1] // 2
    return torch.nn.functional.silu(x[..., :d]) * x[..., d:]


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """The greedy token of each row of logits [B, V]: the first index of the maximum, a NaN counting as the
    maximum (``torch.argmax``'s rule), int64 [B]."""
    return logits.argmax(dim=-1)


def copy_blocks(k_cache: torch.Tensor, v_cache: torch.Tensor, src_to_dst: torch.Tensor) -> None:
    """Copy block ``src`` to block ``dst`` in both caches for each row of ``src_to_dst`` [N, 2] (int64)."""
    for src, dst in src_to_dst.tolist():
        k_cache[dst].copy_(k_cache[src])
        v_cache[dst].copy_(v_cache[src])


def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                 bits: int, group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Weight-only quantized ``x @ W.T + bias`` for x [..., K]: W [N, K] is the fp32 dequantization of the
    format in :mod:`fastinfer.quantization`; the matmul runs in fp32 and the result is cast to x's dtype."""
    from fastinfer.quantization import dequantize

    w = dequantize(qweight, scales, mins, bits, group_size)  # [N, K] fp32
    y = torch.nn.functional.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)


def quantize_activations(x: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of x [M, K] quantized to int8 per block of ``block`` inputs, symmetric: (xq [M, K / block, block]
    float holding integers in [-127, 127], d [M, K / block] fp32) with ``d = max|x| / 127`` and ``xq =
    round_half_even(x * (127 / max|x|))`` in fp32 (0 for an all-zero block), the rounding of the W4A8 kernels."""
    m, k = x.shape
    blocks = x.float().view(m, k // block, block)
    amax = blocks.abs().amax(dim=-1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return torch.round(blocks * inv.unsqueeze(-1)), amax / 127.0


def a8_weights(qweight: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight side of :func:`quant_linear_a8` in ``dtype``: codes [N, K / 16, 16] (int4 unpacked, or int8) and
    the scale of each half-block of 16 inputs [N, K / 16]."""
    from fastinfer.quantization import unpack_int4

    codes = unpack_int4(qweight) if qweight.dtype == torch.uint8 else qweight
    n, k = codes.shape
    return codes.to(dtype).view(n, k // 16, 16), scales.to(dtype).repeat_interleave(group_size // 16, dim=1)


def a8_rows(x2: torch.Tensor, q: torch.Tensor, s: torch.Tensor, mins: torch.Tensor | None, group_size: int,
            ) -> torch.Tensor:
    """:func:`quant_linear_a8` without the bias for rows x2 [M, K], in the dtype of ``q`` / ``s``
    (:func:`a8_weights`): the half-block integer dots (exact in fp32 too: at most 16 x 128 x 127), scaled."""
    m, k = x2.shape
    xq, d = quantize_activations(x2)
    dots = torch.einsum("mhi,nhi->mnh", xq.to(q.dtype).reshape(m, k // 16, 16), q)  # [M, N, 2B]
    y = (dots * d.to(q.dtype).repeat_interleave(2, dim=1).unsqueeze(1) * s.unsqueeze(0)).sum(-1)  # [M, N]
    if mins is not None:
        y = y + x2.to(q.dtype).view(m, k // group_size, group_size).sum(-1) @ mins.to(q.dtype).T
    return y


def quant_linear_a8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                    group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """W4A8 / W8A8 ``x @ W.T + bias`` for x [..., K]: int4 (uint8 [N, K / 2]) or int8 ([N, K]) weights in the
    format of :mod:`fastinfer.quantization` (groups of ``group_size``: a multiple of 32 for int4, of 16 for int8)
    times x quantized to int8 per block of 32 (:func:`quantize_activations`): ``y[m, n] = sum_h d[m, b(h)] *
    scale[n, g(h)] * (q[n, h] . xq[m, h]) + sum_g min[n, g] * sum_{k in g} x[m, k]`` over half-blocks h of 16
    inputs, with exact integer dots and the exact sums of x; float64 here, cast to x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    q, s = a8_weights(qweight, scales, group_size, torch.float64)
    y = a8_rows(x2, q, s, mins, group_size)
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype).view(*x.shape[:-1], qweight.shape[0])


def expert_format(w: torch.Tensor, scales: torch.Tensor | None) -> tuple[int, int, int]:
    """(bits, group size, K) of a stacked expert projection ``w`` [E, N, K'] as ``fused_moe`` takes it: float
    (bits 16 or 32, one group of K), int8 [E, N, K] or packed int4 uint8 [E, N, K // 2] with ``scales``
    [E, N, K // group_size] (the format of :class:`fastinfer.quantization.format.QuantizedExperts`)."""
    if scales is None:
        if w.dtype in (torch.int8, torch.uint8):
            raise ValueError(f"fused_moe: {w.dtype} expert weights need their scales")
        return w.element_size() * 8, w.shape[-1], w.shape[-1]
    bits = {torch.int8: 8, torch.uint8: 4}.get(w.dtype)
    if bits is None:
        raise ValueError(f"fused_moe: quantized expert weights must be int8 or uint8 (packed int4), got {w.dtype}")
    k = w.shape[-1] * (2 if bits == 4 else 1)
    groups = scales.shape[-1]
    if scales.dim() != 3 or tuple(scales.shape[:2]) != tuple(w.shape[:2]) or groups < 1 or k % groups:
        raise ValueError(f"fused_moe: scales {tuple(scales.shape)} do not fit expert weights {tuple(w.shape)}")
    return bits, k // groups, k


def expert_weight(w: torch.Tensor, scales: torch.Tensor | None, mins: torch.Tensor | None, e: int) -> torch.Tensor:
    """Expert ``e``'s [N, K] weight in fp32 (dequantized when ``scales`` is given)."""
    if scales is None:
        return w[e].float()
    from fastinfer.quantization import dequantize

    bits, group, _ = expert_format(w, scales)
    return dequantize(w[e], scales[e], None if mins is None else mins[e], bits, group)


def expert_weights(w: torch.Tensor, scales: torch.Tensor | None, mins: torch.Tensor | None) -> torch.Tensor:
    """Every expert's weight of a stacked projection, fp32 [E, N, K] (dequantized when ``scales`` is given)."""
    return torch.stack([expert_weight(w, scales, mins, e) for e in range(w.shape[0])])


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, w13_scales: torch.Tensor | None = None, w13_mins: torch.Tensor | None = None,
              w2_scales: torch.Tensor | None = None, w2_mins: torch.Tensor | None = None) -> torch.Tensor:
    """Routed SwiGLU experts for x [T, H]: ``out[t] = sum_j topk_weights[t, j] * w2[e] @ (silu(g) * u)`` with
    ``g, u = w13[e, :I] @ x[t], w13[e, I:] @ x[t]`` and ``e = topk_ids[t, j]``; w13 [E, 2I, H] (gate rows, then
    up rows), w2 [E, H, I], topk_weights [T, k] fp32, topk_ids [T, k] int. The projections and the weighted sum
    run in fp32; the activation ``silu(g) * u`` is rounded to x's dtype before the down projection (as HF's
    expert modules compute it in that dtype); the sum is cast to x's dtype at the end. A loop over experts.

    Quantized experts: ``w13`` / ``w2`` int8 or packed int4 (uint8) with ``*_scales`` (and ``*_mins``)
    [E, N, K // group] fp32, the stacked weight-only format (:func:`expert_format`); each projection is
    quantized or not on its own, and the math is the float one over the fp32 dequantized weights."""
    inter = w13.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        tok, slot = (topk_ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        gu = x[tok].float() @ expert_weight(w13, w13_scales, w13_mins, e).T  # [n, 2I]
        act = (torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]).to(x.dtype)
        y = act.float() @ expert_weight(w2, w2_scales, w2_mins, e).T  # [n, H]
        out.index_add_(0, tok, y * topk_weights[tok, slot].float().unsqueeze(1))
    return out.to(x.dtype)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: ``logits[b, j] = -inf`` for every token ``j`` whose bit (bit ``j % 32`` of word ``j // 32`` of row
    ``b``, least significant first; xgrammar's layout) is 0. One token at a time: the spec."""
    words = bitmask.tolist()
    for b in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            if not (words[b][j // 32] >> (j % 32)) & 1:
                logits[b, j] = float("-inf")
