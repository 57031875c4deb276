"""Elementwise activations by their HF names (``hidden_act``, ``activation_function``). Plain torch: the op set
has only the fused ``silu_and_mul`` kernel, so these run as torch ops on every backend (not kernels yet)."""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

Activation = Callable[[torch.Tensor], torch.Tensor]


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


_TANH_GELU = partial(F.gelu, approximate="tanh")
ACTIVATIONS: dict[str, Activation] = {
    "gelu": F.gelu,  # exact (erf)
    "gelu_new": _TANH_GELU,  # GPT-2's tanh approximation
    "gelu_fast": _TANH_GELU,
    "gelu_pytorch_tanh": _TANH_GELU,
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def get_activation(name: str) -> Activation:
    """The activation HF calls ``name``; ValueError naming the supported ones otherwise."""
    fn = ACTIVATIONS.get(name)
    if fn is None:
        raise ValueError(f"unsupported activation {name!r} (supported: {', '.join(ACTIVATIONS)})")
    return fn
