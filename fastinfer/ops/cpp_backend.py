"""The compiled CPU backend: ``paged_attention`` and ``store_kv`` (csrc/cpu/paged_attention.cpp), ``quant_linear``
(csrc/cpu/quant_linear.cpp) and ``fused_moe`` (csrc/cpu/fused_moe.cpp) from the C++ extension ``fastinfer._C``,
registered as ``torch.ops.fastinfer.*`` by csrc/bindings.cpp.

Importing this module fails with ImportError when the extension is not built, so the registry skips the
backend and says why. Cases the kernel does not cover (head_dim not a multiple of 16 or above 256, dtypes
other than fp32/bf16/fp16, mixed dtypes; quant_linear group sizes the kernel lacks; fused_moe with mixed
dtypes or non-contiguous expert weights) fall back to the torch backend with a one-time warning.
"""
from __future__ import annotations

import logging

import torch

from fastinfer.ops import reference, torch_backend
from fastinfer.ops.metadata import AttentionMetadata

try:
    import fastinfer._C  # noqa: F401  (loading the library registers torch.ops.fastinfer.*)
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        "the compiled extension fastinfer._C is not built; build it with "
        "`pip install -e . --no-build-isolation` (torch must be importable while building): " + str(e)
    ) from e

logger = logging.getLogger("fastinfer.ops")


# Shape-only versions for tracing (torch.compile / FakeTensor): both ops only mutate their outputs.
@torch.library.register_fake("fastinfer::paged_attention")
def _paged_attention_fake(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, scale, window, out,
                          softcap=0.0) -> None:
    return None


@torch.library.register_fake("fastinfer::store_kv")
def _store_kv_fake(key, value, k_cache, v_cache, slot_mapping) -> None:
    return None


@torch.library.register_fake("fastinfer::quant_linear")
def _quant_linear_fake(x, qweight, scales, mins, bits, group_size, bias=None) -> torch.Tensor:
    return x.new_empty((x.shape[0], qweight.shape[0]))  # [M, N]


@torch.library.register_fake("fastinfer::fused_moe")
def _fused_moe_fake(x, w13, w2, topk_weights, topk_ids, w13_scales=None, w13_mins=None, w2_scales=None,
                    w2_mins=None) -> torch.Tensor:
    return x.new_empty(x.shape)  # [T, H]


@torch.library.register_fake("fastinfer::quant_linear_a8")
def _quant_linear_a8_fake(x, qweight, scales, mins, group_size, bias=None) -> torch.Tensor:
    return x.new_empty((x.shape[0], qweight.shape[0]))


@torch.library.register_fake("fastinfer::rms_norm")
def _rms_norm_fake(x, weight, eps) -> torch.Tensor:
    return x.new_empty(x.shape)


@torch.library.register_fake("fastinfer::fused_add_rms_norm")
def _fused_add_rms_norm_fake(x, residual, weight, eps) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.register_fake("fastinfer::rotary_embedding")
def _rotary_fake(positions, q, k, cos_sin_cache) -> None:
    return None


@torch.library.register_fake("fastinfer::silu_and_mul")
def _silu_and_mul_fake(x) -> torch.Tensor:
    return x.new_empty((x.shape[0], x.shape[1] // 2))


@torch.library.register_fake("fastinfer::apply_token_bitmask")
def _apply_token_bitmask_fake(logits, bitmask) -> None:
    return None


@torch.library.register_fake("fastinfer::argmax_rows")
def _argmax_rows_fake(x) -> torch.Tensor:
    return x.new_empty((x.shape[0],), dtype=torch.int64)


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_warned: set[str] = set()


def cpu_isa(force: str = "") -> str:
    """The instruction-set variant the kernels use ("generic", "avx2", "avx512", "avx512_bf16"); ``force`` selects one
    ("auto" restores detection). The environment variable FASTINFER_CPU_ISA sets the initial choice."""
    return torch.ops.fastinfer.cpu_isa(force)


def _fallback(why: str) -> None:
    if why not in _warned:
        _warned.add(why)
        logger.warning("cpp backend: %s; using the torch backend for this call", why)


def _rows_ok(x: torch.Tensor) -> bool:
    """[T, H, D] with contiguous heads and dims (the token stride may be anything)."""
    return x.stride(2) == 1 and (x.shape[1] == 1 or x.stride(1) == x.shape[2])


def _unsupported(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> str | None:
    d = q.shape[-1]
    if q.device.type != "cpu":
        return f"tensors on {q.device.type}"
    if q.dtype not in _KERNEL_DTYPES:
        return f"dtype {q.dtype}"
    why = _kv_unsupported(k_cache, v_cache)
    if why is not None:
        return why
    if k_cache.dtype != torch.int8 and (k_cache.dtype != q.dtype or v_cache.dtype != q.dtype):
        return f"mixed dtypes q={q.dtype} cache={k_cache.dtype}"
    if d % 16 or d > 256:
        return f"head_dim {d} (needs a multiple of 16 up to 256)"
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        return "non-contiguous KV cache"
    return None


def _kv_unsupported(k_cache: torch.Tensor, v_cache: torch.Tensor) -> str | None:
    """Why the kernels cannot take these caches (None: they can). Quantized caches: int8 KV only (an fp8 e4m3
    cache, uint8, runs on the torch backend, which dequantizes the gathered rows)."""
    if v_cache.dtype != k_cache.dtype:
        return f"k_cache {k_cache.dtype} and v_cache {v_cache.dtype} differ"
    kind = reference.kv_quant_dtype(k_cache)
    if kind == "fp8_e4m3":
        return "fp8_e4m3 KV cache (the C++ kernels do int8 KV only)"
    return None


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter ``key``/``value`` [T, Hkv, D] into the caches at ``slot_mapping`` (negative slots skipped). An int8
    KV cache ([.., D + 2] int8) gets each row quantized on the way in, as
    :func:`fastinfer.ops.reference.quantize_kv_rows`."""
    quant = k_cache.dtype == torch.int8
    why = _kv_unsupported(k_cache, v_cache)
    if why is None and (k_cache.device.type != "cpu" or not (quant or k_cache.dtype in _KERNEL_DTYPES)
                        or not (k_cache.is_contiguous() and v_cache.is_contiguous())):
        why = f"store_kv on {k_cache.device.type} {k_cache.dtype} cache"
    if why is None and quant and (key.dtype not in _KERNEL_DTYPES or value.dtype != key.dtype):
        why = f"store_kv of {key.dtype} / {value.dtype} rows into an int8 KV cache"
    if why is not None:
        _fallback(why)
        torch_backend.store_kv(key, value, k_cache, v_cache, slot_mapping)
        return
    if not quant:
        key, value = key.to(k_cache.dtype), value.to(k_cache.dtype)
    if not _rows_ok(key):
        key = key.contiguous()
    if not _rows_ok(value):
        value = value.contiguous()
    torch.ops.fastinfer.store_kv(key, value, k_cache, v_cache, slot_mapping.to(torch.int64))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Causal attention of packed queries ``q`` [T, H, D] over the paged cache; same contract as
    :func:`fastinfer.ops.reference.paged_attention`. Every row (decode, prefill, chunked prefill) runs in the
    kernel, which reads the cache blocks in place and only slots below each seq_len; an int8 KV cache's codes
    are widened inside the dot products and scaled once per row (no float copy)."""
    if softcap is not None and not softcap > 0:
        raise ValueError(f"paged_attention: softcap must be positive (or None), got {softcap}")
    why = _unsupported(q, k_cache, v_cache)
    if why is not None:
        _fallback(why)
        return torch_backend.paged_attention(q, k_cache, v_cache, meta, scale, sliding_window, softcap)
    if not _rows_ok(q):
        q = q.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    window = 0 if sliding_window is None else int(sliding_window)
    torch.ops.fastinfer.paged_attention(q, k_cache, v_cache, meta.block_table, meta.seq_lens,
                                        meta.query_start_loc, float(scale), window, out,
                                        0.0 if softcap is None else float(softcap))
    return out


_SCALE_DTYPES = (torch.float32, torch.float16)


def _quant_unsupported(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                       bits: int, group_size: int) -> str | None:
    k = x.shape[-1]
    if not (x.is_cpu and qweight.is_cpu and scales.is_cpu):
        return f"quant_linear on {x.device.type}"
    if x.dtype not in _KERNEL_DTYPES:
        return f"quant_linear x dtype {x.dtype}"
    if scales.dtype not in _SCALE_DTYPES or (mins is not None and mins.dtype not in _SCALE_DTYPES):
        return f"quant_linear scales dtype {scales.dtype}"
    if bits == 8 and not (group_size == k or group_size % 32 == 0):
        return f"quant_linear int8 group_size {group_size} (needs K or a multiple of 32)"
    if bits == 4 and group_size % 32:
        return f"quant_linear int4 group_size {group_size} (needs a multiple of 32)"
    return None



def _contiguous_weight(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The weight's tensors as the kernels read them (contiguous); loaded weights already are, so a step makes no
    ``contiguous()`` calls."""
    if qweight.is_contiguous() and scales.is_contiguous() and (mins is None or mins.is_contiguous()):
        return qweight, scales, mins
    return qweight.contiguous(), scales.contiguous(), None if mins is None else mins.contiguous()

def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                 bits: int, group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Weight-only int8/int4 ``x @ W.T + bias`` for x [..., K] (format of :mod:`fastinfer.quantization`); same
    contract as :func:`fastinfer.ops.reference.quant_linear`. Few rows (decode) expand the weight in registers
    (its exact fp32 values, fp32 sums; csrc/cpu/quant_linear.cpp); many rows dequantize it in chunks to x's
    dtype (fp32 for fp16 x) and run a GEMM (csrc/bindings.cpp, ``quant_linear_prefers`` decides)."""
    why = _quant_unsupported(x, qweight, scales, mins, bits, group_size)
    if why is not None:
        _fallback(why)
        return torch_backend.quant_linear(x, qweight, scales, mins, bits, group_size, bias)
    k = x.shape[-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, k)  # [M, K] (a view when it can be)
    if (k > 1 and x2.stride(1) != 1) or (x2.shape[0] > 1 and x2.stride(0) < k):
        x2 = x2.contiguous()
    if mins is not None and mins.dtype != scales.dtype:  # fp16 -> fp32 is exact
        scales, mins = scales.float(), mins.float()
    qweight, scales, mins = _contiguous_weight(qweight, scales, mins)
    out = torch.ops.fastinfer.quant_linear(x2, qweight, scales, mins, bits, group_size, bias)  # [M, N]
    return out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[-1])  # [..., N]


def _moe_weight_unsupported(name: str, x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor | None,
                            mins: torch.Tensor | None) -> str | None:
    if not w.is_cpu:
        return f"fused_moe on {w.device.type}"
    if not w.is_contiguous():
        return f"fused_moe non-contiguous {name}"
    if scales is None:
        return None if w.dtype == x.dtype else f"fused_moe mixed dtypes x={x.dtype} {name}={w.dtype}"
    _, group, _ = reference.expert_format(w, scales)
    if group % 16:
        return f"fused_moe {name} group size {group} (the kernel needs a multiple of 16)"
    for t in (scales, mins):
        if t is not None and (t.dtype != torch.float32 or not t.is_contiguous() or not t.is_cpu):
            return f"fused_moe {name} scales / mins not contiguous fp32 CPU tensors"
    return None


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, w13_scales: torch.Tensor | None = None, w13_mins: torch.Tensor | None = None,
              w2_scales: torch.Tensor | None = None, w2_mins: torch.Tensor | None = None) -> torch.Tensor:
    """Routed experts for x [T, H]; same contract as :func:`fastinfer.ops.reference.fused_moe` (float or int8 /
    int4 experts). Tokens are grouped by expert in the kernel (csrc/cpu/fused_moe.cpp), so each chosen expert's
    w13 [2I, H] and w2 [H, I] (or their codes and scales) are read once per call and the others not at all; every
    T runs there."""
    why = None if x.is_cpu else f"fused_moe on {x.device.type}"
    if why is None and x.dtype not in _KERNEL_DTYPES:
        why = f"fused_moe dtype {x.dtype}"
    why = why or _moe_weight_unsupported("w13", x, w13, w13_scales, w13_mins) or _moe_weight_unsupported(
        "w2", x, w2, w2_scales, w2_mins)
    if why is not None:
        _fallback(why)
        return torch_backend.fused_moe(x, w13, w2, topk_weights, topk_ids, w13_scales, w13_mins, w2_scales, w2_mins)
    return torch.ops.fastinfer.fused_moe(x.contiguous(), w13, w2, topk_weights.float(), topk_ids, w13_scales,
                                         w13_mins, w2_scales, w2_mins)


def quant_linear_a8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                    group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """W4A8 / W8A8 (int4 or int8 weights, x quantized to int8 per block of 32, integer dot products); same contract as
    :func:`fastinfer.ops.reference.quant_linear_a8` (csrc/cpu/quant_linear_a8.cpp). Every row count runs in the
    kernel, so a row's output does not depend on the batch."""
    x2 = _rows_2d(x)
    k = x.shape[-1]
    int4 = qweight.dtype == torch.uint8
    ok = (x2 is not None and qweight.is_cpu and qweight.dtype in (torch.uint8, torch.int8) and k % 32 == 0
          and group_size % (32 if int4 else 16) == 0 and k % group_size == 0 and scales.dtype in _SCALE_DTYPES
          and (mins is None or mins.dtype == scales.dtype) and (bias is None or bias.dtype == x.dtype))
    if not ok or x2 is None:
        _fallback(f"quant_linear_a8 on {x.device.type} {x.dtype} group {group_size} scales {scales.dtype}")
        return torch_backend.quant_linear_a8(x, qweight, scales, mins, group_size, bias)
    qweight, scales, mins = _contiguous_weight(qweight, scales, mins)
    out = torch.ops.fastinfer.quant_linear_a8(x2, qweight, scales, mins, group_size, bias)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], qweight.shape[0])


# ----------------------------------------------------------------------- the per-layer ops (csrc/cpu/fused_ops.cpp)


def _rows_2d(x: torch.Tensor) -> torch.Tensor | None:
    """x as [rows, last] with a unit inner stride (a view when it can be), or None when x is not a CPU tensor of
    a kernel dtype."""
    if not x.is_cpu or x.dtype not in _KERNEL_DTYPES or x.dim() < 1:
        return None
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    return x2 if x2.shape[-1] <= 1 or x2.stride(-1) == 1 else x2.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of the rows of x [..., H]; same contract as :func:`fastinfer.ops.reference.rms_norm` (fp32 sums,
    the normalised row rounded to x's dtype, then times the weight)."""
    x2 = _rows_2d(x)
    if x2 is None or weight.dtype != x.dtype or not weight.is_cpu:
        _fallback(f"rms_norm on {x.device.type} {x.dtype} (weight {weight.dtype})")
        return torch_backend.rms_norm(x, weight, eps)
    return torch.ops.fastinfer.rms_norm(x2, weight.contiguous(), float(eps)).view(x.shape)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = residual + x`` (rounded to the dtype), then RMSNorm of s, in one pass; returns (normed, s)."""
    x2, r2 = _rows_2d(x), _rows_2d(residual)
    if x2 is None or r2 is None or residual.dtype != x.dtype or weight.dtype != x.dtype or x.shape != residual.shape:
        _fallback(f"fused_add_rms_norm on {x.device.type} {x.dtype} (residual {residual.dtype}, weight "
                  f"{weight.dtype})")
        return torch_backend.fused_add_rms_norm(x, residual, weight, eps)
    out, s = torch.ops.fastinfer.fused_add_rms_norm(x2, r2, weight.contiguous(), float(eps))
    return out.view(x.shape), s.view(x.shape)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX rotary embedding of q [T, H, D] and k [T, Hkv, D] **in place** (they are returned); the numbers of
    :func:`fastinfer.ops.reference.rotary_embedding` (cos / sin rounded to the dtype, each product and sum rounded
    as the torch ops round them)."""
    ok = (q.is_cpu and k.is_cpu and q.dtype in _KERNEL_DTYPES and k.dtype == q.dtype and q.dim() == 3
          and k.dim() == 3 and _rows_ok(q) and _rows_ok(k) and cos_sin_cache.dtype == torch.float32
          and cos_sin_cache.is_contiguous())
    if not ok:
        _fallback(f"rotary_embedding on {q.device.type} {q.dtype} q {tuple(q.shape)} strides {q.stride()}")
        return torch_backend.rotary_embedding(positions, q, k, cos_sin_cache)
    torch.ops.fastinfer.rotary_embedding(positions.long(), q, k, cos_sin_cache)
    return q, k


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` (silu rounded to x's dtype, then the product), one pass."""
    x2 = _rows_2d(x)
    if x2 is None or x.shape[-1] % 2:
        _fallback(f"silu_and_mul on {x.device.type} {x.dtype} {tuple(x.shape)}")
        return torch_backend.silu_and_mul(x)
    return torch.ops.fastinfer.silu_and_mul(x2).view(*x.shape[:-1], x.shape[-1] // 2)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """The greedy token of each row of fp32 logits [B, V]: the first index of the maximum (a NaN wins, as in
    ``torch.argmax``), int64 [B]; one SIMD pass per row (csrc/cpu/fused_ops.cpp)."""
    if not logits.is_cpu or logits.dtype != torch.float32 or logits.dim() != 2 or logits.shape[1] == 0:
        _fallback(f"argmax on {logits.device.type} {logits.dtype} {tuple(logits.shape)}")
        return torch_backend.argmax(logits)
    x2 = logits if logits.stride(-1) == 1 else logits.contiguous()
    return torch.ops.fastinfer.argmax_rows(x2)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: ``logits[b, j] = -inf`` where bit ``j % 32`` of ``bitmask[b, j // 32]`` is 0 (xgrammar's layout);
    all-ones words skipped, all-zero words one vector fill (csrc/cpu/fused_ops.cpp)."""
    ok = (logits.is_cpu and logits.dtype == torch.float32 and logits.dim() == 2 and logits.shape[1] > 0
          and logits.stride(-1) == 1 and bitmask.is_cpu and bitmask.dtype == torch.int32 and bitmask.dim() == 2
          and bitmask.shape[0] == logits.shape[0] and bitmask.shape[1] >= (logits.shape[1] + 31) // 32)
    if not ok:
        _fallback(f"apply_token_bitmask on {logits.device.type} {logits.dtype} {tuple(logits.shape)}")
        torch_backend.apply_token_bitmask(logits, bitmask)
        return
    torch.ops.fastinfer.apply_token_bitmask(logits, bitmask.contiguous())
