"""The Triton backend: every op of :data:`fastinfer.ops.registry.OPS` as a Triton kernel from
``fastinfer.kernels``. Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests prove
the kernels without a GPU). Importing this module raises ImportError when Triton is missing, so the registry
falls back to the next backend and says why.

Three layers, as in FlashInfer:

1. raw kernels and their launchers in ``kernels/`` (``fastinfer.kernels.*``): tensors and host ints in, no
   metadata objects;
2. a thin binding per op, a torch custom op ``torch.ops.fastinfer.triton_<op>`` (``torch.library.custom_op``;
   the caches it writes are declared in ``mutates_args``) with a fake implementation that checks the inputs'
   metadata with the launcher's own checks and allocates the outputs without touching data. So a forward
   traces under ``FakeTensorMode`` (on a fake CUDA device too, without a GPU) and ``torch.compile`` sees one
   opaque node per op; the Triton launch runs only for real tensors;
3. the documented Python ops below, with the signatures every backend shares; ``paged_attention`` unpacks
   :class:`AttentionMetadata` into its tensors plus host ints for its custom op.

The names carry a ``triton_`` prefix: ``fastinfer::paged_attention``, ``store_kv`` and ``quant_linear`` are the
compiled CPU kernels (csrc/bindings.cpp, :mod:`fastinfer.ops.cpp_backend`).
"""
from __future__ import annotations

try:
    import triton  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(f"the triton backend needs the `triton` package (pip install 'fastinfer[triton]'): {e}") from e

import torch

from fastinfer.kernels import activation as _act
from fastinfer.kernels import attention as _attn
from fastinfer.kernels import cache as _cache
from fastinfer.kernels import moe as _moe
from fastinfer.kernels import norm as _norm
from fastinfer.kernels import quant as _quant
from fastinfer.kernels import rotary as _rotary
from fastinfer.ops.metadata import AttentionMetadata

Tensor = torch.Tensor

# ------------------------------------------------------------------------------------------------- bindings


@torch.library.custom_op("fastinfer::triton_store_kv", mutates_args=("k_cache", "v_cache"))
def _store_kv_op(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    _cache.store_kv(key, value, k_cache, v_cache, slot_mapping)


@_store_kv_op.register_fake
def _store_kv_fake(key, value, k_cache, v_cache, slot_mapping) -> None:
    _cache.check_store_kv(key, value, k_cache, v_cache, slot_mapping)


@torch.library.custom_op("fastinfer::triton_paged_attention", mutates_args=())
def _paged_attention_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
                        query_start_loc: Tensor, scale: float, sliding_window: int | None, num_decodes: int,
                        max_decode_seq_len: int, max_prefill_query_len: int, softcap: float | None = None) -> Tensor:
    out = q.new_empty(q.shape)  # [T, H, D]
    _attn.paged_attention_varlen(q, k_cache, v_cache, out, block_table, seq_lens, query_start_loc, num_decodes,
                                 max_decode_seq_len, max_prefill_query_len, scale, sliding_window, softcap)
    return out


@_paged_attention_op.register_fake
def _paged_attention_fake(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, scale, sliding_window,
                          num_decodes, max_decode_seq_len, max_prefill_query_len, softcap=None) -> Tensor:
    _attn.check_attention_inputs(q, k_cache, v_cache, block_table, seq_lens, query_start_loc)
    assert 0 <= num_decodes <= seq_lens.shape[0], f"num_decodes {num_decodes} of {seq_lens.shape[0]} sequences"
    return q.new_empty(q.shape)


@torch.library.custom_op("fastinfer::triton_rms_norm", mutates_args=())
def _rms_norm_op(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return _norm.rms_norm(x, weight, eps)


@_rms_norm_op.register_fake
def _rms_norm_fake(x, weight, eps) -> Tensor:
    return x.new_empty(x.shape, dtype=_norm.check_rms_norm(x, None, weight))


@torch.library.custom_op("fastinfer::triton_fused_add_rms_norm", mutates_args=())
def _fused_add_rms_norm_op(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return _norm.fused_add_rms_norm(x, residual, weight, eps)


@_fused_add_rms_norm_op.register_fake
def _fused_add_rms_norm_fake(x, residual, weight, eps) -> tuple[Tensor, Tensor]:
    out_dtype = _norm.check_rms_norm(x, residual, weight)
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape)


@torch.library.custom_op("fastinfer::triton_rotary_embedding", mutates_args=())
def _rotary_embedding_op(positions: Tensor, q: Tensor, k: Tensor, cos_sin_cache: Tensor) -> tuple[Tensor, Tensor]:
    return _rotary.rotary_embedding(positions, q, k, cos_sin_cache)


@_rotary_embedding_op.register_fake
def _rotary_embedding_fake(positions, q, k, cos_sin_cache) -> tuple[Tensor, Tensor]:
    _rotary.check_rotary(positions, q, k, cos_sin_cache)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format))


@torch.library.custom_op("fastinfer::triton_silu_and_mul", mutates_args=())
def _silu_and_mul_op(x: Tensor) -> Tensor:
    return _act.silu_and_mul(x)


@_silu_and_mul_op.register_fake
def _silu_and_mul_fake(x) -> Tensor:
    _act.check_silu_and_mul(x)
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@torch.library.custom_op("fastinfer::triton_copy_blocks", mutates_args=("k_cache", "v_cache"))
def _copy_blocks_op(k_cache: Tensor, v_cache: Tensor, src_to_dst: Tensor) -> None:
    _cache.copy_blocks(k_cache, v_cache, src_to_dst)


@_copy_blocks_op.register_fake
def _copy_blocks_fake(k_cache, v_cache, src_to_dst) -> None:
    _cache.check_copy_blocks(k_cache, v_cache, src_to_dst)


@torch.library.custom_op("fastinfer::triton_quant_linear", mutates_args=())
def _quant_linear_op(x: Tensor, qweight: Tensor, scales: Tensor, mins: Tensor | None, bits: int, group_size: int,
                     bias: Tensor | None) -> Tensor:
    return _quant.quant_linear(x, qweight, scales, mins, bits, group_size, bias)


@_quant_linear_op.register_fake
def _quant_linear_fake(x, qweight, scales, mins, bits, group_size, bias) -> Tensor:
    n, _ = _quant.check_quant_linear(x, qweight, scales, mins, bits, group_size, bias)
    return x.new_empty((*x.shape[:-1], n))


@torch.library.custom_op("fastinfer::triton_fused_moe", mutates_args=())
def _fused_moe_op(x: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor,
                  w13_scales: Tensor | None = None, w13_mins: Tensor | None = None, w2_scales: Tensor | None = None,
                  w2_mins: Tensor | None = None) -> Tensor:
    return _moe.fused_moe(x, w13, w2, topk_weights, topk_ids, w13_scales, w13_mins, w2_scales, w2_mins)


@_fused_moe_op.register_fake
def _fused_moe_fake(x, w13, w2, topk_weights, topk_ids, w13_scales=None, w13_mins=None, w2_scales=None,
                    w2_mins=None) -> Tensor:
    _moe.check_fused_moe(x, w13, w2, topk_weights, topk_ids, w13_scales, w13_mins, w2_scales, w2_mins)
    return x.new_empty(x.shape)


# ------------------------------------------------------------------------------------------------- Python ops


def store_kv(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Write ``key``/``value`` [T, Hkv, D] into ``k_cache``/``v_cache`` [num_blocks, block_size, Hkv, D] at the
    flat slots ``slot_mapping`` [T] (``block * block_size + offset``); negative slots (padding) are skipped.
    Key and value may be strided views (head dim contiguous) and of another float dtype than the caches. An int8
    / uint8 (fp8 e4m3) cache [..., D + 2] gets each row quantised with its fp16 scale, bit-exact with
    :func:`fastinfer.ops.reference.quantize_kv_rows`."""
    torch.ops.fastinfer.triton_store_kv.default(key, value, k_cache, v_cache, slot_mapping)


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata, scale: float,
                    sliding_window: int | None = None, softcap: float | None = None) -> Tensor:
    """Causal attention of packed queries ``q`` [T, H, D] over the paged caches [num_blocks, block_size, Hkv, D]:
    the semantics of :func:`fastinfer.ops.reference.paged_attention`, on float or quantized (int8 / fp8 e4m3 rows
    with their scales: codes in the dot products, scales on the score and probability columns) caches. The
    ``meta.num_decodes`` leading decode rows go to the split-KV decode kernel, the other sequences to the varlen
    prefill kernel; the host lists of ``meta`` size the grids (no device read)."""
    nd = meta.num_decodes
    if softcap is not None and not softcap > 0:
        raise ValueError(f"paged_attention: softcap must be positive (or None), got {softcap}")
    return torch.ops.fastinfer.triton_paged_attention.default(
        q, k_cache, v_cache, meta.block_table, meta.seq_lens, meta.query_start_loc, float(scale),
        None if sliding_window is None else int(sliding_window), nd, max(meta.seq_lens_cpu[:nd], default=0),
        max(meta.query_lens_cpu[nd:], default=0), None if softcap is None else float(softcap))


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm of ``x`` [..., N] over its last dim (fp32 math), scaled by ``weight`` [N] after casting back to
    x's dtype (the HF convention); the result has dtype ``promote_types(weight.dtype, x.dtype)``."""
    return torch.ops.fastinfer.triton_rms_norm.default(x, weight, float(eps))


def fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``s = residual + x``; returns ``(rms_norm(s), s)`` as new tensors (the inputs are not modified)."""
    return torch.ops.fastinfer.triton_fused_add_rms_norm.default(x, residual, weight, float(eps))


def rotary_embedding(positions: Tensor, q: Tensor, k: Tensor, cos_sin_cache: Tensor) -> tuple[Tensor, Tensor]:
    """NeoX-style RoPE of ``q`` [T, H, D] and ``k`` [T, Hkv, D] at ``positions`` [T] with ``cos_sin_cache``
    [max_pos, rot] (cos in the first half, sin in the second); features past ``rot`` are copied. Returns new
    tensors."""
    return torch.ops.fastinfer.triton_rotary_embedding.default(positions, q, k, cos_sin_cache)


def silu_and_mul(x: Tensor) -> Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for ``x`` [..., 2d]; returns [..., d]."""
    return torch.ops.fastinfer.triton_silu_and_mul.default(x)


def copy_blocks(k_cache: Tensor, v_cache: Tensor, src_to_dst: Tensor) -> None:
    """For each row ``(src, dst)`` of ``src_to_dst`` [N, 2] int64, copy block ``src`` of both caches onto block
    ``dst``; no ``dst`` may also be a ``src`` (copy-on-write copies into fresh blocks)."""
    torch.ops.fastinfer.triton_copy_blocks.default(k_cache, v_cache, src_to_dst)


def quant_linear(x: Tensor, qweight: Tensor, scales: Tensor, mins: Tensor | None, bits: int, group_size: int,
                 bias: Tensor | None = None) -> Tensor:
    """Weight-only int8/int4 ``x @ W.T + bias`` for x [..., K] -> [..., N] in x's dtype, over the format of
    :mod:`fastinfer.quantization`: the semantics of :func:`fastinfer.ops.reference.quant_linear`. The kernel
    path (GEMV, split-K, GEMM, dequantize + matmul) follows the number of rows, see
    :func:`fastinfer.kernels.quant.quant_linear` (which also takes the tuning arguments)."""
    return torch.ops.fastinfer.triton_quant_linear.default(x, qweight, scales, mins, int(bits), int(group_size),
                                                           bias)


def fused_moe(x: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor,
              w13_scales: Tensor | None = None, w13_mins: Tensor | None = None, w2_scales: Tensor | None = None,
              w2_mins: Tensor | None = None) -> Tensor:
    """Routed SwiGLU experts (float or int8 / int4 weight-only experts, dequantized as the tiles load), the
    semantics of :func:`fastinfer.ops.reference.fused_moe`: pairs sorted by expert
    into BLOCK_M-aligned groups on the device (no host read), one grouped GEMM for gate/up with SiLU-mul in its
    epilogue, one for down with the top-k weights in its epilogue, then the k slots summed in order
    (:mod:`fastinfer.kernels.moe`)."""
    return torch.ops.fastinfer.triton_fused_moe.default(x, w13, w2, topk_weights, topk_ids, w13_scales, w13_mins,
                                                        w2_scales, w2_mins)


__all__ = ["store_kv", "paged_attention", "rms_norm", "fused_add_rms_norm", "rotary_embedding", "silu_and_mul",
           "copy_blocks", "quant_linear", "fused_moe"]
