"""The portable torch backend: vectorised versions of the reference ops, fast enough for CPU serving."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastinfer.ops import reference
from fastinfer.ops.metadata import AttentionMetadata


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def _window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Boolean [.., Q, K] mask: key visible to query (causal, optionally windowed)."""
    ok = k_pos <= q_pos
    if sliding_window is not None:
        ok = ok & (k_pos > q_pos - sliding_window)
    return ok


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
            seq_lens: list[int], scale: float, sliding_window: int | None) -> torch.Tensor:
    """One query per sequence, all sequences in one padded SDPA call."""
    b, bs = len(seq_lens), k_cache.shape[1]
    max_len = max(seq_lens)
    nb = -(-max_len // bs)
    idx = block_table[:b, :nb].long()
    k = k_cache[idx].flatten(1, 2)  # [B, nb*bs, Hkv, D]
    v = v_cache[idx].flatten(1, 2)
    lens = torch.tensor(seq_lens, device=q.device)
    k_pos = torch.arange(nb * bs, device=q.device)
    valid = _window_mask((lens - 1)[:, None], k_pos[None, :], sliding_window) & (k_pos[None, :] < lens[:, None])
    # Zero what is masked so stale or NaN slots cannot leak through 0 * NaN.
    k = torch.where(valid[:, :, None, None], k, 0)
    v = torch.where(valid[:, :, None, None], v, 0)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2),  # [B, H, 1, D], [B, Hkv, S, D]
        attn_mask=valid[:, None, None, :], scale=scale, enable_gqa=True)
    return out.squeeze(2)  # [B, H, D]


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


rotary_embedding = reference.rotary_embedding
silu_and_mul = reference.silu_and_mul
