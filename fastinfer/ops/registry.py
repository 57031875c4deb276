"""Which implementation of each op runs: cuda -> triton -> cpp -> torch, per tensor device, overridable.

Backends register their functions here at import. ``OpSet`` resolves every op once for a device (and an
optional preferred backend) and says what it picked, so a missing fast path is visible, never silent.
Override with ``FASTINFER_BACKEND=torch|cpp|triton|cuda|flash_attn`` or the engine argument ``attention_backend``
(``flash_attn``: flash-attn's paged attention, only when asked for, see ops/flash_attn_backend.py).
``cpp`` is the compiled CPU extension ``fastinfer._C`` (csrc/); it runs on CPU tensors only. ``cuda`` is the CUDA
C++ kernels, the extension ``fastinfer._C_cuda`` (csrc/cuda/), built only with a CUDA torch and nvcc:
:func:`compiled_tiers` says which tiers this install has.
"""
from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("fastinfer.ops")

OPS = ("store_kv", "paged_attention", "rms_norm", "fused_add_rms_norm", "rotary_embedding", "silu_and_mul",
       "copy_blocks", "quant_linear", "quant_linear_a8", "fused_moe", "argmax", "apply_token_bitmask")
BACKENDS = ("cuda", "triton", "cpp", "torch")
# asked for by name only, then followed by BACKENDS for the ops they lack (flash_attn: attention only, and only on
# blocks of a multiple of 256 tokens)
OPT_IN_BACKENDS = ("flash_attn",)
# ops with no Triton kernel: on a GPU they run the torch backend (argmax, the token bitmask: one device op each)
# or not at all in practice (W4A8 is a CPU technique)
OPS_WITHOUT_TRITON = ("argmax", "quant_linear_a8", "apply_token_bitmask")
# Modules that provide each backend, imported lazily (a missing compiler or GPU must not break import).
_BACKEND_MODULES = {
    "torch": "fastinfer.ops.torch_backend",
    "triton": "fastinfer.ops.triton_backend",
    "cuda": "fastinfer.ops.cuda_backend",
    "cpp": "fastinfer.ops.cpp_backend",
    "flash_attn": "fastinfer.ops.flash_attn_backend",
}


def compiled_tiers() -> dict[str, str]:
    """Which compiled tiers this install has: ``{"cpp": ..., "cuda": ...}``, each "built" or "not built (why)".
    ``cpp`` is ``fastinfer._C``; ``cuda`` is ``fastinfer._C_cuda``, the CUDA implementations of the same ops (it is
    built only with a CUDA torch and nvcc). Loads what exists; touches no GPU."""
    try:
        import torch

        import fastinfer._C  # noqa: F401
    except ImportError as e:
        return {"cpp": f"not built ({e})", "cuda": "not built (no compiled extension fastinfer._C)"}
    try:
        import fastinfer._C_cuda  # noqa: F401
    except ImportError as e:
        if torch.version.cuda is None:
            why = "CPU-only torch"
        elif "No module named" in str(e):
            why = "fastinfer._C_cuda was not compiled: reinstall with nvcc on PATH or CUDA_HOME set"
        else:
            why = f"fastinfer._C_cuda does not load: {e}"
        return {"cpp": "built", "cuda": f"not built ({why})"}
    if not torch._C._dispatch_has_kernel_for_dispatch_key("fastinfer::paged_attention", "CUDA"):
        return {"cpp": "built", "cuda": "not built (fastinfer._C_cuda registered no CUDA kernels)"}
    return {"cpp": "built", "cuda": "built"}


def backend_status(backend: str, device_type: str, requested: bool = False) -> tuple[Any | None, str]:
    """(module, "") when ``backend`` can run on ``device_type``, else (None, why not). On CPU tensors Triton
    runs only through its interpreter, and only when asked for by name (it is a correctness path there).

    Resolving needs no GPU: for "cuda" the Triton backend is chosen whenever ``triton`` imports (no driver is
    touched until a kernel launches), so a model can be built for a fake CUDA device under FakeTensorMode on a
    CPU-only machine; its ops then run their fake implementations."""
    if backend in ("cuda", "flash_attn") and device_type != "cuda":
        return None, "needs a CUDA device"
    if backend == "triton" and device_type != "cuda" and not (requested and os.environ.get("TRITON_INTERPRET") == "1"):
        return None, "needs a CUDA device (on CPU: TRITON_INTERPRET=1 and the backend asked for by name)"
    if backend == "cpp" and device_type != "cpu":
        return None, "runs on CPU tensors only"
    try:
        return importlib.import_module(_BACKEND_MODULES[backend]), ""
    except ImportError as e:
        return None, f"not importable ({e})"


@dataclass
class OpSet:
    """Every op resolved for one device. ``chosen`` maps op -> backend that runs it."""

    device_type: str = "cpu"
    prefer: str | None = None
    chosen: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        prefer = self.prefer or os.environ.get("FASTINFER_BACKEND") or None
        if prefer is not None and prefer not in BACKENDS + OPT_IN_BACKENDS:
            raise ValueError(f"unknown backend {prefer!r}; choose from {BACKENDS + OPT_IN_BACKENDS}")
        order = BACKENDS if prefer is None else (prefer,) + tuple(b for b in BACKENDS if b != prefer)
        modules = {}
        for b in order:
            mod, why = backend_status(b, self.device_type, requested=b == prefer)
            if mod is None:
                self.skipped[b] = why
                if b == prefer:
                    raise RuntimeError(f"backend {prefer!r} was asked for but {why}")
            else:
                modules[b] = mod
        for op in OPS:
            for b in order:
                fn = getattr(modules.get(b), op, None)
                if fn is not None:
                    setattr(self, op, fn)
                    self.chosen[op] = b
                    break
            else:  # pragma: no cover - the torch backend has every op
                raise RuntimeError(f"no backend implements {op}")
        logger.info("ops on %s: %s%s", self.device_type, self.describe(),
                    "".join(f"; {b} skipped: {w}" for b, w in self.skipped.items()))

    def describe(self) -> str:
        return ", ".join(f"{op}={b}" for op, b in self.chosen.items())

    # Attributes set in __post_init__; declared for type checkers.
    store_kv: Callable[..., Any] = field(init=False, repr=False)
    paged_attention: Callable[..., Any] = field(init=False, repr=False)
    rms_norm: Callable[..., Any] = field(init=False, repr=False)
    fused_add_rms_norm: Callable[..., Any] = field(init=False, repr=False)
    rotary_embedding: Callable[..., Any] = field(init=False, repr=False)
    silu_and_mul: Callable[..., Any] = field(init=False, repr=False)
    copy_blocks: Callable[..., Any] = field(init=False, repr=False)
    quant_linear: Callable[..., Any] = field(init=False, repr=False)
    quant_linear_a8: Callable[..., Any] = field(init=False, repr=False)
    fused_moe: Callable[..., Any] = field(init=False, repr=False)
    argmax: Callable[..., Any] = field(init=False, repr=False)
    apply_token_bitmask: Callable[..., Any] = field(init=False, repr=False)
