"""The CUDA C++ backend: ``paged_attention`` (split-KV decode, GQA-aware), ``store_kv``, ``rms_norm``,
``fused_add_rms_norm``, ``rotary_embedding`` and ``quant_linear`` (W4A16 / W8A16 GEMV) from csrc/cuda/, the CUDA
implementations of the ``torch.ops.fastinfer.*`` ops whose CPU implementations the ``cpp`` backend calls (one
schema, two dispatch keys: csrc/bindings.cpp and csrc/cuda/bindings_cuda.cpp).

Importing this module raises ImportError unless ``fastinfer._C`` was built with the CUDA kernels (a CUDA torch and
nvcc at build time, setup.py), so the registry skips the backend and says why, and a forced
``FASTINFER_BACKEND=cuda`` fails with that reason. Inputs the kernels do not cover (fp32 attention or weights'
activations, head sizes other than 64 / 128, quantized KV caches, query-head groups too large for shared memory,
quant_linear group sizes off the 16-byte chunk) go to the next backend (Triton when it imports, else torch), logged
once per reason. Batches with prefill rows go to Triton's varlen prefill kernel when Triton imports: the CUDA
attention kernel reads the cache once per query token, which is the decode shape (it is correct for every row and
serves them all without Triton).
"""
from __future__ import annotations

import logging
from types import ModuleType

import torch

from fastinfer.ops import cpp_backend, torch_backend  # noqa: F401  (cpp_backend: loads fastinfer._C, the ops' fakes)
from fastinfer.ops.metadata import AttentionMetadata
from fastinfer.ops.registry import compiled_tiers

if compiled_tiers()["cuda"] != "built":
    raise ImportError(f"CUDA kernels: {compiled_tiers()['cuda']}")

logger = logging.getLogger("fastinfer.ops")

_next: ModuleType
try:
    from fastinfer.ops import triton_backend as _triton

    _next = _triton
except ImportError:  # pragma: no cover - depends on the install
    _triton = None  # type: ignore[assignment]
    _next = torch_backend

_HALF = (torch.float16, torch.bfloat16)
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_warned: set[str] = set()


def _fallback(why: str) -> ModuleType:
    """The backend that runs a call the CUDA kernels do not cover (logged once per reason)."""
    if why not in _warned:
        _warned.add(why)
        logger.warning("cuda backend: %s; using the %s backend for this call", why, _next.__name__.rsplit(".", 1)[-1]
                       .removesuffix("_backend"))
    return _next


def _rows_ok(x: torch.Tensor) -> bool:
    """[T, H, D] with contiguous heads and dims (the token stride may be anything)."""
    return x.dim() == 3 and x.stride(2) == 1 and (x.shape[1] == 1 or x.stride(1) == x.shape[2])


def _attention_unsupported(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> str | None:
    if not q.is_cuda:
        return f"paged_attention on {q.device.type}"
    if q.dtype not in _HALF:
        return f"paged_attention dtype {q.dtype} (the kernel runs fp16 / bf16)"
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        return f"paged_attention cache dtype {k_cache.dtype} with q {q.dtype}"
    if q.shape[-1] not in (64, 128):
        return f"paged_attention head_dim {q.shape[-1]} (the kernel has 64 and 128)"
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        return "paged_attention non-contiguous KV cache"
    return None


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter ``key``/``value`` [T, Hkv, D] into the caches at ``slot_mapping`` (negative slots skipped); one CTA
    per token, 16-byte copies when aligned."""
    if (not k_cache.is_cuda or k_cache.dtype not in _KERNEL_DTYPES or v_cache.dtype != k_cache.dtype
            or not (k_cache.is_contiguous() and v_cache.is_contiguous())):
        _fallback(f"store_kv on a {k_cache.device.type} {k_cache.dtype} cache").store_kv(key, value, k_cache, v_cache,
                                                                                          slot_mapping)
        return
    key, value = key.to(k_cache.dtype), value.to(k_cache.dtype)
    key = key if _rows_ok(key) else key.contiguous()
    value = value if _rows_ok(value) else value.contiguous()
    torch.ops.fastinfer.store_kv(key, value, k_cache, v_cache, slot_mapping.to(torch.int64))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Causal attention of packed queries ``q`` [T, H, D] over the paged cache, the contract of
    :func:`fastinfer.ops.reference.paged_attention`: the split-KV CUDA kernel (csrc/include/fastinfer/cuda/
    paged_attention.cuh) for decode batches; batches with prefill rows run Triton's varlen kernels when Triton is
    importable."""
    if softcap is not None and not softcap > 0:
        raise ValueError(f"paged_attention: softcap must be positive (or None), got {softcap}")
    why = _attention_unsupported(q, k_cache, v_cache)
    if why is None and _triton is not None and meta.num_decodes < meta.num_seqs:
        why = "paged_attention batch with prefill rows (the CUDA kernel is a decode kernel)"
    if why is None and q.shape[1] // k_cache.shape[2] > 32:
        why = f"paged_attention with {q.shape[1] // k_cache.shape[2]} query heads per KV head"
    if why is not None:
        return _fallback(why).paged_attention(q, k_cache, v_cache, meta, scale, sliding_window, softcap)
    q = q if _rows_ok(q) else q.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    torch.ops.fastinfer.paged_attention(q, k_cache, v_cache, meta.block_table, meta.seq_lens, meta.query_start_loc,
                                        float(scale), 0 if sliding_window is None else int(sliding_window), out,
                                        0.0 if softcap is None else float(softcap))
    return out


def _rows_2d(x: torch.Tensor) -> torch.Tensor | None:
    """x as [rows, last] with a unit inner stride on CUDA in a kernel dtype, else None."""
    if not x.is_cuda or x.dtype not in _KERNEL_DTYPES or x.dim() < 1:
        return None
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    return x2 if x2.shape[-1] <= 1 or x2.stride(-1) == 1 else x2.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of the rows of x [..., H] (fp32 sums; the normalised row rounded to x's dtype, then times the
    weight), one CTA per row."""
    x2 = _rows_2d(x)
    if x2 is None or weight.dtype != x.dtype or x.shape[-1] == 0:
        return _fallback(f"rms_norm on {x.device.type} {x.dtype} (weight {weight.dtype})").rms_norm(x, weight, eps)
    return torch.ops.fastinfer.rms_norm(x2, weight.contiguous(), float(eps)).view(x.shape)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = residual + x`` (rounded to the dtype), then RMSNorm of s, in one kernel; returns (normed, s)."""
    x2, r2 = _rows_2d(x), _rows_2d(residual)
    if (x2 is None or r2 is None or residual.dtype != x.dtype or weight.dtype != x.dtype or x.shape != residual.shape
            or x.shape[-1] == 0):
        return _fallback(f"fused_add_rms_norm on {x.device.type} {x.dtype} (residual {residual.dtype}, weight "
                         f"{weight.dtype})").fused_add_rms_norm(x, residual, weight, eps)
    out, s = torch.ops.fastinfer.fused_add_rms_norm(x2, r2, weight.contiguous(), float(eps))
    return out.view(x.shape), s.view(x.shape)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX rotary embedding of q [T, H, D] and k [T, Hkv, D] **in place** (returned), rounded as the reference;
    positions outside the cache leave their token unchanged (the CPU kernel raises)."""
    ok = (q.is_cuda and k.is_cuda and q.dtype in _KERNEL_DTYPES and k.dtype == q.dtype and _rows_ok(q)
          and _rows_ok(k) and cos_sin_cache.dtype == torch.float32 and cos_sin_cache.is_contiguous())
    if not ok:
        return _fallback(f"rotary_embedding on {q.device.type} {q.dtype} q {tuple(q.shape)} strides {q.stride()}"
                         ).rotary_embedding(positions, q, k, cos_sin_cache)
    torch.ops.fastinfer.rotary_embedding(positions.long(), q, k, cos_sin_cache)
    return q, k


def _quant_unsupported(x: torch.Tensor, bits: int, group_size: int, scales: torch.Tensor,
                       mins: torch.Tensor | None) -> str | None:
    k = x.shape[-1]
    chunk = 32 if bits == 4 else 16
    if not x.is_cuda:
        return f"quant_linear on {x.device.type}"
    if x.dtype not in _HALF:
        return f"quant_linear x dtype {x.dtype} (the kernel runs fp16 / bf16)"
    if k % chunk or group_size % chunk:
        return f"quant_linear int{bits} K={k} group_size {group_size} (needs multiples of {chunk})"
    if mins is not None and mins.dtype != scales.dtype:
        return f"quant_linear scales {scales.dtype} with mins {mins.dtype}"
    return None


def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                 bits: int, group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Weight-only int8/int4 ``x @ W.T + bias`` for x [..., K]; the contract of
    :func:`fastinfer.ops.reference.quant_linear`. Up to 8 rows: the GEMV kernel (each 16-byte chunk of codes read
    once, dequantized in registers, fp32 sums); more: W dequantized to x's dtype in chunks and cuBLAS."""
    why = _quant_unsupported(x, bits, group_size, scales, mins)
    if why is not None:
        return _fallback(why).quant_linear(x, qweight, scales, mins, bits, group_size, bias)
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if (k > 1 and x2.stride(1) != 1) or (x2.shape[0] > 1 and x2.stride(0) % 8) or x2.data_ptr() % 16:
        x2 = x2.contiguous()
    out = torch.ops.fastinfer.quant_linear(x2, qweight.contiguous(), scales.contiguous(),
                                           None if mins is None else mins.contiguous(), int(bits), int(group_size),
                                           bias)
    return out.view(*x.shape[:-1], out.shape[-1])


__all__ = ["store_kv", "paged_attention", "rms_norm", "fused_add_rms_norm", "rotary_embedding", "quant_linear"]
