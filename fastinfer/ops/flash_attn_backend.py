"""Optional attention backend over flash-attn 2 (``pip install flash-attn``, 2.6 or later): ``paged_attention`` for
prefill, chunked prefill and decode rows alike through ``flash_attn_varlen_func`` reading the paged cache through its
``block_table`` (bottom-right-aligned causal mask, ``window_size=(window - 1, 0)``, ``softcap``).

Asked for by name only (``attention_backend="flash_attn"`` / ``FASTINFER_BACKEND=flash_attn``), never picked
automatically: flash-attn's paged KV needs blocks of a multiple of 256 tokens (its check "Paged KV cache block size
must be divisible by 256"), and the engine's default block is 16. Calls it cannot take (other block sizes, fp32,
quantized or mixed-dtype caches) go to the next backend (cuda, then Triton, then torch), logged once per reason; the
other ops come from those backends too. Importing raises ImportError without a recent enough flash-attn.
"""
from __future__ import annotations

import importlib
import inspect
import logging
from types import ModuleType

import torch

try:
    from flash_attn import flash_attn_varlen_func
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(f"the flash_attn backend needs the flash-attn package (pip install flash-attn): {e}") from e
if not {"block_table", "softcap"} <= set(inspect.signature(flash_attn_varlen_func).parameters):
    raise ImportError("the flash_attn backend needs flash-attn 2.6 or later (flash_attn_varlen_func with block_table "
                      "and softcap)")

from fastinfer.ops.metadata import AttentionMetadata  # noqa: E402

logger = logging.getLogger("fastinfer.ops")
PAGE_MULTIPLE = 256
_warned: set[str] = set()


def _next_backend() -> ModuleType:
    for name in ("cuda_backend", "triton_backend", "torch_backend"):
        try:
            return importlib.import_module(f"fastinfer.ops.{name}")
        except ImportError:
            continue
    raise RuntimeError("no attention backend after flash_attn")  # pragma: no cover - torch always imports


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Causal attention of packed queries ``q`` [T, H, D] over the paged cache, the contract of
    :func:`fastinfer.ops.reference.paged_attention`, in one flash-attn varlen call."""
    if softcap is not None and not softcap > 0:
        raise ValueError(f"paged_attention: softcap must be positive (or None), got {softcap}")
    why = None
    if k_cache.shape[1] % PAGE_MULTIPLE:
        why = f"block size {k_cache.shape[1]} (flash-attn's paged KV needs a multiple of {PAGE_MULTIPLE})"
    elif q.dtype not in (torch.float16, torch.bfloat16) or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        why = f"q {q.dtype} with a {k_cache.dtype} cache (flash-attn runs fp16 / bf16 caches of q's dtype)"
    if why is not None:
        nxt = _next_backend()
        if why not in _warned:
            _warned.add(why)
            logger.warning("flash_attn backend: %s; using %s for this call", why, nxt.__name__.rsplit(".", 1)[-1])
        return nxt.paged_attention(q, k_cache, v_cache, meta, scale, sliding_window, softcap)
    cu_k = torch.zeros(meta.seq_lens.shape[0] + 1, dtype=torch.int32, device=q.device)
    cu_k[1:] = torch.cumsum(meta.seq_lens, 0, dtype=torch.int32)
    window = (-1, -1) if sliding_window is None else (int(sliding_window) - 1, 0)
    return flash_attn_varlen_func(q, k_cache, v_cache, meta.query_start_loc, cu_k, max(meta.max_query_len, 1),
                                  max(meta.max_seq_len, 1), softmax_scale=float(scale), causal=True,
                                  window_size=window, softcap=0.0 if softcap is None else float(softcap),
                                  block_table=meta.block_table)


__all__ = ["paged_attention"]
