"""The portable torch backend: vectorised versions of the reference ops, fast enough for CPU serving."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastinfer.ops import reference
from fastinfer.ops.metadata import AttentionMetadata


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    if slot_mapping.numel() and int(slot_mapping.min()) < 0:  # padding slots: skip them
        keep = slot_mapping >= 0
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def _window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Boolean [Q, K] mask: key visible to query (causal, optionally windowed)."""
    ok = k_pos <= q_pos
    if sliding_window is not None:
        ok = ok & (k_pos > q_pos - sliding_window)
    return ok


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
            seq_lens: list[int], scale: float, sliding_window: int | None) -> torch.Tensor:
    """One query per sequence. A loop over sequences with exact slicing beats one padded batched call on
    CPU (no padding work, no mask, stale or NaN slots past ``seq_len`` are never read); fp32 math."""
    b, num_heads, d = q.shape
    num_kv = k_cache.shape[2]
    out = torch.empty_like(q)  # [B, H, D]
    qg = q.view(b, num_kv, num_heads // num_kv, d).float()  # [B, Hkv, G, D]
    for i, slen in enumerate(seq_lens):
        lo = 0 if sliding_window is None else max(0, slen - sliding_window)
        k = reference.gather_kv(k_cache, block_table[i], slen)[lo:].float()  # [L, Hkv, D]
        v = reference.gather_kv(v_cache, block_table[i], slen)[lo:].float()
        probs = (torch.einsum("hgd,lhd->hgl", qg[i], k) * scale).softmax(dim=-1)
        out[i] = torch.einsum("hgl,lhd->hgd", probs, v).reshape(num_heads, d)
    return out


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, sliding_window: int | None = None) -> torch.Tensor:
    out = torch.empty_like(q)  # [T, H, D]
    nd = meta.num_decodes
    if nd:
        out[:nd] = _decode(q[:nd], k_cache, v_cache, meta.block_table, meta.seq_lens_cpu[:nd], scale,
                           sliding_window)
    start = nd
    for i in range(nd, meta.num_seqs):
        qlen, slen = meta.query_lens_cpu[i], meta.seq_lens_cpu[i]
        qi = q[start:start + qlen].transpose(0, 1)  # [H, q, D]
        k = reference.gather_kv(k_cache, meta.block_table[i], slen).transpose(0, 1)  # [Hkv, L, D]
        v = reference.gather_kv(v_cache, meta.block_table[i], slen).transpose(0, 1)
        if qlen == slen and (sliding_window is None or slen <= sliding_window):
            o = F.scaled_dot_product_attention(qi, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            q_pos = torch.arange(slen - qlen, slen, device=q.device)[:, None]
            mask = _window_mask(q_pos, torch.arange(slen, device=q.device)[None, :], sliding_window)
            o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start:start + qlen] = o.transpose(0, 1)
        start += qlen
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    return reference.rms_norm(x, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    s = residual + x
    return rms_norm(s, weight, eps), s


def copy_blocks(k_cache: torch.Tensor, v_cache: torch.Tensor, src_to_dst: torch.Tensor) -> None:
    src, dst = src_to_dst[:, 0], src_to_dst[:, 1]
    k_cache[dst] = k_cache[src]
    v_cache[dst] = v_cache[src]


rotary_embedding = reference.rotary_embedding
silu_and_mul = reference.silu_and_mul


def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                 bits: int, group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize to x's dtype, then one dense matmul (correct everywhere, no faster than the float model)."""
    from fastinfer.quantization import dequantize

    w = dequantize(qweight, scales, mins, bits, group_size).to(x.dtype)  # [N, K]
    return F.linear(x, w, bias)
