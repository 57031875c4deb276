"""The only kernel API of fastinfer. Layers get an :class:`OpSet` (every op resolved to the best backend
for their device); :mod:`fastinfer.ops.reference` is the plain-torch spec that every backend must match.

Ops (shapes: T tokens, H query heads, Hkv KV heads, D head dim):

- ``store_kv(key, value, k_cache, v_cache, slot_mapping)``: scatter [T, Hkv, D] into the paged caches.
- ``paged_attention(q, k_cache, v_cache, meta, scale, sliding_window=None, softcap=None) -> [T, H, D]``: causal
  attention of packed variable-length queries over the paged cache (prefill, chunked prefill and decode alike);
  ``softcap`` caps the scores to ``softcap * tanh(score / softcap)`` before the softmax (Gemma 2).
- ``rms_norm(x, weight, eps)``, ``fused_add_rms_norm(x, residual, weight, eps) -> (normed, residual)``.
- ``rotary_embedding(positions, q, k, cos_sin_cache) -> (q, k)``: NeoX-style RoPE.
- ``silu_and_mul(x) -> silu(x[..., :d]) * x[..., d:]``.
- ``copy_blocks(k_cache, v_cache, src_to_dst)``: copy whole KV blocks (copy-on-write forks), pairs [N, 2].
- ``quant_linear(x, qweight, scales, mins, bits, group_size, bias=None) -> [..., N]``: weight-only int8/int4
  matmul over the format of :mod:`fastinfer.quantization` (W = q * scale + min per group, fp32).
- ``quant_linear_a8(x, qweight, scales, mins, group_size, bias=None) -> [..., N]``: W4A8, int4 weights times x
  quantized to int8 per block of 32 (integer dot products, llama.cpp's Q4 x Q8 technique; changes numerics, so
  only the ``w4a8`` quantization method uses it).
- ``fused_moe(x, w13, w2, topk_weights, topk_ids) -> [T, Hd]``: routed SwiGLU experts (Mixture of Experts) for
  x [T, Hd]; w13 [E, 2I, Hd] (each expert's gate rows, then up rows), w2 [E, Hd, I], topk_weights [T, k] fp32
  (already normalised as the model routes), topk_ids [T, k] int32/int64: ``out[t] = sum_j topk_weights[t, j] *
  w2[e] @ (silu(w13[e, :I] @ x[t]) * (w13[e, I:] @ x[t]))``, ``e = topk_ids[t, j]``; fp32 accumulation, the
  activation rounded to x's dtype before the down projection. Quantized experts: ``w13`` / ``w2`` int8 or packed
  int4 (uint8) codes with ``w13_scales`` / ``w13_mins`` / ``w2_scales`` / ``w2_mins`` [E, N, K // group] fp32 (the
  stacked weight-only format, ``quantization.format.QuantizedExperts``), each projection on its own.

- ``argmax(logits) -> [B]``: the greedy token of each row of fp32 logits [B, V] (first maximum; NaN wins).
- ``apply_token_bitmask(logits, bitmask)``: in place, ``logits[b, j] = -inf`` where bit ``j % 32`` of
  ``bitmask[b, j // 32]`` (int32 [B, ceil(V / 32)], xgrammar's layout) is 0 (structured outputs).

Every op traces without data (FakeTensorMode, also on a fake CUDA device without a GPU, and torch.compile): the
Triton and compiled CPU kernels are torch custom ops (``torch.ops.fastinfer.triton_*``, and
``torch.ops.fastinfer.paged_attention`` / ``store_kv`` / ``quant_linear``) with fake implementations, and the
torch backend reads nothing back to the host. :meth:`AttentionMetadata.build` is vectorised (numpy on the host,
one host-to-device copy).
"""
from fastinfer.ops.metadata import AttentionMetadata
from fastinfer.ops.registry import BACKENDS, OPS, OpSet

__all__ = ["AttentionMetadata", "BACKENDS", "OPS", "OpSet"]
