"""Which implementation of each op runs: cuda -> triton -> torch, per tensor device, overridable.

Backends register their functions here at import. ``OpSet`` resolves every op once for a device (and an
optional preferred backend) and says what it picked, so a missing fast path is visible, never silent.
Override with ``FASTINFER_BACKEND=torch|triton|cuda`` or the engine argument ``attention_backend``.
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
       "copy_blocks")
BACKENDS = ("cuda", "triton", "torch")
# Modules that provide each backend, imported lazily (a missing compiler or GPU must not break import).
_BACKEND_MODULES = {
    "torch": "fastinfer.ops.torch_backend",
    "triton": "fastinfer.ops.triton_backend",
    "cuda": "fastinfer.ops.cuda_backend",
}


def backend_status(backend: str, device_type: str) -> tuple[Any | None, str]:
    """(module, "") when ``backend`` can run on ``device_type``, else (None, why not)."""
    if backend == "cuda" and device_type != "cuda":
        return None, "needs a CUDA device"
    if backend == "triton" and device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return None, "needs a CUDA device or TRITON_INTERPRET=1"
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
        if prefer is not None and prefer not in BACKENDS:
            raise ValueError(f"unknown backend {prefer!r}; choose from {BACKENDS}")
        order = BACKENDS if prefer is None else (prefer,) + tuple(b for b in BACKENDS if b != prefer)
        modules = {}
        for b in order:
            mod, why = backend_status(b, self.device_type)
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
