"""The Triton backend: every op of :data:`fastinfer.ops.registry.OPS` (plus ``copy_blocks``) as a Triton kernel
from ``fastinfer.kernels``. Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (how the
tests prove the kernels without a GPU). Importing this module raises ImportError when Triton is missing, so
the registry falls back to the next backend and says why."""
from __future__ import annotations

try:
    import triton  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(f"the triton backend needs the `triton` package (pip install 'fastinfer[triton]'): {e}") from e

from fastinfer.kernels.activation import silu_and_mul
from fastinfer.kernels.attention import paged_attention
from fastinfer.kernels.cache import copy_blocks, store_kv
from fastinfer.kernels.norm import fused_add_rms_norm, rms_norm
from fastinfer.kernels.quant import quant_linear
from fastinfer.kernels.rotary import rotary_embedding

__all__ = ["store_kv", "paged_attention", "rms_norm", "fused_add_rms_norm", "rotary_embedding", "silu_and_mul",
           "copy_blocks", "quant_linear"]
