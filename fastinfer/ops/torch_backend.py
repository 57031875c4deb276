"""The portable torch backend: vectorised versions of the reference ops, fast enough for CPU serving."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastinfer.ops import reference
from fastinfer.ops.metadata import AttentionMetadata


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter ``key``/``value`` [T, Hkv, D] into the caches at ``slot_mapping`` [T]; negative slots (padding)
    are skipped without a host sync: a padding token rewrites the slot of the first real token of the batch
    with that token's own key and value (duplicate indices carrying equal values, so the result is the same in
    any order), and when every token is padding all of them rewrite slot 0 with its current contents."""
    t = slot_mapping.shape[0]
    if t == 0:
        return
    slots = slot_mapping.long()
    valid = slots >= 0  # [T]
    src = torch.where(valid, torch.arange(t, device=slots.device), valid.to(torch.uint8).argmax())  # [T]
    dst = slots.index_select(0, src).clamp_min(0)
    real = valid.index_select(0, src).view(t, 1, 1)  # False only when no token is real
    kind = reference.kv_quant_dtype(k_cache)
    if kind is not None:  # quantized rows [T, Hkv, D + 2] (the spec's own vectorised quantization)
        key, value = reference.quantize_kv_rows(key, kind), reference.quantize_kv_rows(value, kind)
    for x, cache in ((key, k_cache), (value, v_cache)):
        flat = cache.view(-1, *cache.shape[2:])  # [num_slots, Hkv, D]
        rows = torch.where(real, x.index_select(0, src).to(cache.dtype), flat.select(0, 0))
        flat.index_copy_(0, dst, rows)


def _gather_kv(cache: torch.Tensor, blocks: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Positions ``start .. end - 1`` of one sequence from the paged cache: [end - start, Hkv, D]. (narrow and
    index_select instead of Python indexing: indexing a fake CUDA tensor would need a CUDA runtime.)"""
    bs = cache.shape[1]
    first, nb = start // bs, -(-end // bs) - start // bs
    rows = cache.index_select(0, blocks.narrow(0, first, nb).long()).reshape(nb * bs, *cache.shape[2:])
    return rows.narrow(0, start - first * bs, end - start)


def _gather_values(cache: torch.Tensor, blocks: torch.Tensor, start: int, end: int, dtype: torch.dtype,
                   ) -> torch.Tensor:
    """:func:`_gather_kv` as values of ``dtype``: a quantized cache's rows dequantized (only the gathered
    positions, never the whole cache)."""
    rows = _gather_kv(cache, blocks, start, end)
    if reference.kv_quant_dtype(cache) is None:
        return rows.to(dtype)
    return reference.dequantize_kv(rows).to(dtype)


def _window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Boolean [Q, K] mask: key visible to query (causal, optionally windowed)."""
    ok = k_pos <= q_pos
    if sliding_window is not None:
        ok = ok & (k_pos > q_pos - sliding_window)
    return ok


def _softcap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``softcap * tanh(scores / softcap)`` (Gemma 2's attention logit cap); the scores as they are without one."""
    return scores if softcap is None else softcap * torch.tanh(scores / softcap)


def _capped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                      softcap: float) -> torch.Tensor:
    """Soft-capped attention (SDPA has no cap) of q [H, Q, D] over k, v [Hkv, L, D] with a boolean mask [Q, L];
    fp32 math, [H, Q, D] in q's dtype."""
    h, n, d = q.shape
    hkv = k.shape[0]
    qg = q.reshape(hkv, h // hkv, n, d).float()  # [Hkv, G, Q, D]
    scores = _softcap(torch.einsum("hgqd,hld->hgql", qg, k.float()) * scale, softcap)
    scores = torch.where(mask, scores, float("-inf"))
    return torch.einsum("hgql,hld->hgqd", scores.softmax(dim=-1), v.float()).reshape(h, n, d).to(q.dtype)


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
            seq_lens: list[int], scale: float, sliding_window: int | None, softcap: float | None) -> torch.Tensor:
    """One query per sequence. A loop over sequences with exact slicing beats one padded batched call on
    CPU (no padding work, no mask, stale or NaN slots past ``seq_len`` are never read); fp32 math."""
    b, num_heads, d = q.shape
    num_kv = k_cache.shape[2]
    qg = q.view(b, num_kv, num_heads // num_kv, d).float()  # [B, Hkv, G, D]
    outs = []
    for i, slen in enumerate(seq_lens):
        lo = 0 if sliding_window is None else max(0, slen - sliding_window)
        blocks = block_table.select(0, i)
        k = _gather_values(k_cache, blocks, lo, slen, torch.float32)  # [L, Hkv, D]
        v = _gather_values(v_cache, blocks, lo, slen, torch.float32)
        probs = _softcap(torch.einsum("hgd,lhd->hgl", qg.select(0, i), k) * scale, softcap).softmax(dim=-1)
        outs.append(torch.einsum("hgl,lhd->hgd", probs, v).reshape(num_heads, d))
    return torch.stack(outs).to(q.dtype)  # [B, H, D]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Causal attention of packed queries ``q`` [T, H, D] over the paged cache; same contract as
    :func:`fastinfer.ops.reference.paged_attention`. Decode rows loop in fp32, prefill rows go to SDPA (with a
    ``softcap``, which SDPA lacks: fp32 einsums); the host lists of ``meta`` drive the slicing (no device read)."""
    nd = meta.num_decodes
    parts = []
    if nd:
        parts.append(_decode(q.narrow(0, 0, nd), k_cache, v_cache, meta.block_table, meta.seq_lens_cpu[:nd], scale,
                             sliding_window, softcap))
    start = nd
    # a quantized cache's rows are dequantized to fp32 and the prefill math runs in fp32 (as the reference)
    kv_dtype = q.dtype if reference.kv_quant_dtype(k_cache) is None else torch.float32
    for i in range(nd, meta.num_seqs):
        qlen, slen = meta.query_lens_cpu[i], meta.seq_lens_cpu[i]
        if qlen == 0:
            continue
        qi = q.narrow(0, start, qlen).transpose(0, 1).to(kv_dtype)  # [H, q, D]
        blocks = meta.block_table.select(0, i)
        # keys from the first query's window on: blocks before it may be a sliding-window group's null block
        lo = 0 if sliding_window is None else max(0, slen - qlen - sliding_window + 1)
        k = _gather_values(k_cache, blocks, lo, slen, kv_dtype).transpose(0, 1)  # [Hkv, L, D]
        v = _gather_values(v_cache, blocks, lo, slen, kv_dtype).transpose(0, 1)
        # 4-D [1, H, L, D]: SDPA's fused CPU kernel takes batched inputs only (3-D runs the math path, ~4x slower)
        if softcap is None and qlen == slen and (sliding_window is None or slen <= sliding_window):
            o = F.scaled_dot_product_attention(qi.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), is_causal=True,
                                               scale=scale, enable_gqa=True).squeeze(0)
        else:
            q_pos = torch.arange(slen - qlen, slen, device=q.device).unsqueeze(1)
            mask = _window_mask(q_pos, torch.arange(lo, slen, device=q.device).unsqueeze(0), sliding_window)
            o = (_capped_attention(qi, k, v, mask, scale, softcap) if softcap is not None else
                 F.scaled_dot_product_attention(qi.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask,
                                                scale=scale, enable_gqa=True).squeeze(0))
        parts.append(o.transpose(0, 1).to(q.dtype))
        start += qlen
    if start < q.shape[0]:  # rows past the batch's tokens (padding): zeros
        parts.append(q.new_zeros((q.shape[0] - start, *q.shape[1:])))
    if not parts:
        return q.new_empty(q.shape)
    return torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()  # [T, H, D]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    return reference.rms_norm(x, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    s = residual + x
    return rms_norm(s, weight, eps), s


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """The greedy token of each row of logits [B, V] (int64 [B], the first maximum; NaN wins)."""
    return logits.argmax(dim=-1)


def copy_blocks(k_cache: torch.Tensor, v_cache: torch.Tensor, src_to_dst: torch.Tensor) -> None:
    src, dst = src_to_dst.select(1, 0), src_to_dst.select(1, 1)
    k_cache.index_copy_(0, dst, k_cache.index_select(0, src))
    v_cache.index_copy_(0, dst, v_cache.index_select(0, src))


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fastinfer.ops.reference.rotary_embedding` (the same ops, so the same bits) with narrow and
    index_select instead of Python indexing."""
    rot = cos_sin_cache.shape[1]
    half = rot // 2
    cos, sin = cos_sin_cache.index_select(0, positions.long()).chunk(2, dim=-1)  # [T, rot/2] each

    def apply(x: torch.Tensor) -> torch.Tensor:
        c, s = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
        x1, x2, rest = x.narrow(-1, 0, half), x.narrow(-1, half, half), x.narrow(-1, rot, x.shape[-1] - rot)
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], dim=-1)

    return apply(q), apply(k)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for x [..., 2d]."""
    d = x.shape[-1] // 2
    return F.silu(x.narrow(-1, 0, d)) * x.narrow(-1, d, d)


def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                 bits: int, group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize to x's dtype, then one dense matmul (correct everywhere, no faster than the float model)."""
    from fastinfer.quantization import dequantize

    w = dequantize(qweight, scales, mins, bits, group_size).to(x.dtype)  # [N, K]
    return F.linear(x, w, bias)


def quant_linear_a8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                    group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`fastinfer.ops.reference.quant_linear_a8` in fp32 (its integer half-block dots are exact there), in
    chunks of rows so the [rows, N, half-blocks] dot tensor stays under 16M elements."""
    x2 = x.reshape(-1, x.shape[-1])
    q, s = reference.a8_weights(qweight, scales, group_size, torch.float32)
    n, nh = q.shape[0], q.shape[1]
    step = max(1, (1 << 24) // max(1, n * nh))
    chunks = [reference.a8_rows(x2.narrow(0, r0, min(step, x2.shape[0] - r0)), q, s, mins, group_size)
              for r0 in range(0, x2.shape[0], step)]
    y = torch.cat(chunks) if chunks else x2.new_zeros(0, n, dtype=torch.float32)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], n)


def _experts_fp32(w: torch.Tensor, scales: torch.Tensor | None, mins: torch.Tensor | None,
                  ids: torch.Tensor | int) -> torch.Tensor:
    """Experts ``ids``' weights [len(ids), N, K] in fp32 (an int: that one expert, [1, N, K]) of a stacked
    projection, float or quantized: dequantized after the gather, so only those experts' bytes are read."""
    def pick(t: torch.Tensor) -> torch.Tensor:
        return t.narrow(0, ids, 1) if isinstance(ids, int) else t.index_select(0, ids)

    if scales is None:
        return pick(w).float()
    from fastinfer.quantization import dequantize

    bits, group, k = reference.expert_format(w, scales)
    q, s = pick(w), pick(scales)
    m = None if mins is None else pick(mins)
    rows = q.shape[0] * q.shape[1]
    flat = dequantize(q.reshape(rows, -1), s.reshape(rows, -1), None if m is None else m.reshape(rows, -1), bits,
                      group)
    return flat.view(q.shape[0], q.shape[1], k)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, w13_scales: torch.Tensor | None = None, w13_mins: torch.Tensor | None = None,
              w2_scales: torch.Tensor | None = None, w2_mins: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`fastinfer.ops.reference.fused_moe` without a host sync or a data-dependent shape (so it traces
    under FakeTensorMode and torch.compile), in one of two static-shape forms:

    - few routed slots (``T * k <= E``, decode): the chosen experts' weights are gathered per slot
      (``index_select``) and run as one batched matmul, reading only the active experts;
    - otherwise every expert runs on every token and a [T, E] combine matrix (the top-k weights scattered by
      expert id, zero elsewhere) weights the results: ``E / k`` times the routed FLOPs, each expert's weights
      read once; rows of tokens that did not choose an expert are masked out (an fp16 overflow there, or NaN
      weights in an expert nobody chose, cannot leak in as 0 * inf). Grouping tokens per expert would need the
      per-expert counts on the host (a sync); that is the compiled CPU and Triton kernels' job.
    Projections and the weighted sum in fp32, the activation rounded to x's dtype, as the reference."""
    t, hidden = x.shape
    num_experts, inter = w13.shape[0], w13.shape[1] // 2
    k = topk_ids.shape[1]
    xf = x.float()
    if t * k <= num_experts:
        ids = topk_ids.reshape(-1).long()  # [T*k]
        gu = torch.bmm(_experts_fp32(w13, w13_scales, w13_mins, ids), xf.repeat_interleave(k, 0).unsqueeze(2))
        act = (F.silu(gu.narrow(1, 0, inter)) * gu.narrow(1, inter, inter)).to(x.dtype).float()
        y = torch.bmm(_experts_fp32(w2, w2_scales, w2_mins, ids), act).view(t, k, hidden)  # [T, k, H]
        return (y * topk_weights.float().unsqueeze(2)).sum(1).to(x.dtype)
    ids = topk_ids.long()
    combine = torch.zeros(t, num_experts, dtype=torch.float32, device=x.device)
    combine.scatter_add_(1, ids, topk_weights.float())  # [T, E]
    chosen = torch.zeros(t, num_experts, dtype=torch.bool, device=x.device).scatter_(1, ids, True)  # [T, E]
    out = torch.zeros(t, hidden, dtype=torch.float32, device=x.device)
    for e in range(num_experts):
        gu = F.linear(xf, _experts_fp32(w13, w13_scales, w13_mins, e).select(0, 0))  # [T, 2I]
        act = (F.silu(gu.narrow(1, 0, inter)) * gu.narrow(1, inter, inter)).to(x.dtype).float()
        y = F.linear(act, _experts_fp32(w2, w2_scales, w2_mins, e).select(0, 0))  # [T, H]; rows of tokens that did not
        out.addcmul_(torch.where(chosen.narrow(1, e, 1), y, 0.0), combine.narrow(1, e, 1))  # choose e are dropped
    return out.to(x.dtype)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: ``logits[b, j] = -inf`` where bit ``j % 32`` of ``bitmask[b, j // 32]`` is 0 (the reference's
    contract), vectorised: the words expanded to one bit per token, then one ``masked_fill_``; no host sync."""
    b, v = logits.shape
    words = bitmask.to(logits.device, non_blocking=True).narrow(1, 0, (v + 31) // 32)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).reshape(b, -1).narrow(1, 0, v)
    logits.masked_fill_(allowed == 0, float("-inf"))
