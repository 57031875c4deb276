"""Weight-only quantization (W8A16 / W4A16): formats, methods, quantizers and calibration.

- :mod:`~fastinfer.quantization.methods`: the :class:`QuantMethod` interface (parse -> create or load weights ->
  apply) and the registry; one file per method (:mod:`~fastinfer.quantization.int8`,
  :mod:`~fastinfer.quantization.int4`, :mod:`~fastinfer.quantization.gguf`);
- :mod:`~fastinfer.quantization.format`: :class:`QuantizedWeight`, the one layout every kernel reads;
- :mod:`~fastinfer.quantization.rtn`: round-to-nearest quantizers; :mod:`~fastinfer.quantization.gptq`: GPTQ;
- :mod:`~fastinfer.quantization.rotation`, :mod:`~fastinfer.quantization.tune` and
  :mod:`~fastinfer.quantization.calibrate`: the calibrated recipe of ``fastinfer quantize --calibrate``.

Importing this package imports no torch (``fastinfer.config`` parses method names with it); the names that
need torch load on first use.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fastinfer.quantization.methods import (
    QuantMethod,
    QuantSpec,
    get_method,
    method_for,
    method_of,
    parse_method,
    register_method,
    resolve_method,
    supported_methods,
    unregister_method,
)

if TYPE_CHECKING:
    from fastinfer.quantization.format import QuantizedWeight, dequantize, from_tensors, pack_int4, unpack_int4
    from fastinfer.quantization.int4 import INT4_GROUP_SIZES
    from fastinfer.quantization.rtn import fit_group_size, quantize, quantize_int4, quantize_int8

_LAZY = {
    "QuantizedWeight": "format", "dequantize": "format", "from_tensors": "format", "pack_int4": "format",
    "unpack_int4": "format", "INT4_GROUP_SIZES": "int4",
    "fit_group_size": "rtn", "quantize": "rtn", "quantize_int4": "rtn", "quantize_int8": "rtn",
}

__all__ = [
    "QuantMethod", "QuantSpec", "get_method", "method_for", "method_of", "parse_method", "register_method",
    "resolve_method", "supported_methods", "unregister_method",
    "QuantizedWeight", "dequantize", "from_tensors", "pack_int4", "unpack_int4", "INT4_GROUP_SIZES",
    "fit_group_size", "quantize", "quantize_int4", "quantize_int8",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"fastinfer.quantization.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'fastinfer.quantization' has no attribute {name!r}")
