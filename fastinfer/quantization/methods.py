"""The :class:`QuantMethod` interface and the registry of methods (``int8``, ``int4``, ``gguf``, ...).

A method is one file (``fastinfer/quantization/<name>.py``) with one subclass of :class:`QuantMethod`, plus one
line in ``_METHODS`` below (or one :func:`register_method` call from user code). Its life cycle:

1. **parse**: :func:`parse_method` turns a ``quantization=`` string into a :class:`QuantSpec` (method name,
   group size). Torch-free: ``fastinfer.config`` validates engine arguments with it, and importing this module
   (or a method file) imports no torch, so method files import torch inside their functions only.
2. **create or load**: :meth:`QuantMethod.quantize_weight` quantizes a float weight (at load, by
   ``model.quantize`` and ``fastinfer quantize``); :meth:`QuantMethod.load_weight` rebuilds a weight from the
   tensors a checkpoint stored (a directory saved by ``fastinfer quantize``); :attr:`keeps_file_quantization`
   says whether a GGUF file's own quantized tensors are taken as they are.
3. **apply**: :meth:`QuantMethod.apply` computes a quantized :class:`fastinfer.layers.linear.Linear`'s output;
   the layer keeps the method its weight came from (``layer.quant_method``).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

if TYPE_CHECKING:
    import torch

    from fastinfer.layers.linear import Linear
    from fastinfer.quantization.format import QuantizedExperts, QuantizedWeight


class QuantSpec(NamedTuple):
    """A parsed ``quantization=`` string: the registered method name (None: no quantization) and the group size
    asked for (None: the method's default). Compares equal to the plain tuple ``(method, group_size)``."""

    method: str | None
    group_size: int | None


class QuantMethod:
    """One weight-only quantization method (see the module docstring). Subclasses set ``name`` and override
    what differs; the defaults serve any method that stores :class:`~fastinfer.quantization.format.QuantizedWeight`
    tensors and runs them through the op set's ``quant_linear`` kernel."""

    name: ClassVar[str] = ""
    spellings: ClassVar[tuple[str, ...]] = ()  # how to write it, for error messages (default: the name)
    bits: ClassVar[int | None] = None  # bits of the weights it creates (None: it creates none)
    quantize_at_load: ClassVar[bool] = True  # load_model(quantization=...) quantizes the float projections
    keeps_file_quantization: ClassVar[bool] = True  # a GGUF file's quantized tensors are kept as they are
    supports_calibration: ClassVar[bool] = False  # GPTQ + tuning (``fastinfer quantize --calibrate``) apply

    def parse(self, spec: str) -> QuantSpec | None:
        """The spec for ``spec`` when it names this method, else None. Must not import torch."""
        return QuantSpec(self.name, None) if spec == self.name else None

    def group_size(self, in_features: int, requested: int | None = None) -> int:
        """The group size a weight with ``in_features`` inputs gets when ``requested`` is asked for."""
        raise NotImplementedError(f"quantization method {self.name!r} creates no weights")

    def quantize_weight(self, w: torch.Tensor, group_size: int | None = None) -> QuantizedWeight | None:
        """Create: quantize a float [out, in] weight (None: this method leaves float weights float)."""
        return None

    def quantize_experts(self, w: torch.Tensor, group_size: int | None = None) -> QuantizedExperts | None:
        """Create, for a Mixture-of-Experts projection: the float [E, out, in] experts quantized one by one
        (:meth:`quantize_weight`) and stacked in the format ``fused_moe`` reads (None: left float)."""
        from fastinfer.quantization.format import QuantizedExperts

        parts = [self.quantize_weight(w[e], group_size) for e in range(w.shape[0])]
        if any(p is None for p in parts):
            return None
        return QuantizedExperts.stack([p for p in parts if p is not None])

    def load_weight(self, parts: dict[str, torch.Tensor]) -> QuantizedWeight | QuantizedExperts:
        """Load: a weight from the tensors a checkpoint stored for it (``qweight``, ``scales``, ``mins``; 3-D for
        stacked experts); ValueError saying what is wrong otherwise."""
        from fastinfer.quantization.format import from_tensors

        return from_tensors(parts)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + bias`` of a quantized layer (``layer.quant`` holds the weight): the op set's kernel, which
        reads the shared format as is. Differentiable in the weight's scales and mins with the torch op set."""
        q = layer.quant
        assert q is not None and layer.ops is not None, "a quantized Linear needs its weight and an OpSet"
        return layer.ops.quant_linear(x, q.qweight, q.scales, q.mins, q.bits, q.group_size, layer.bias)

    def adopts(self, qw: QuantizedWeight) -> bool:
        """Whether a quantized weight read from a file (a GGUF file's kept tensors, a saved directory's) is applied
        by this method rather than by the plain int8 / int4 method of its bits (W4A8 takes the int4 ones)."""
        return False

    def describe(self, qw: QuantizedWeight) -> str:
        """A short name for a weight of this method (``describe_quantization``, saved configs)."""
        return f"int{qw.bits} g{qw.group_size}"

    def __repr__(self) -> str:
        return f"<QuantMethod {self.name}>"


# name -> "module:Class" (imported when first used; method modules import no torch at import) or an instance.
_METHODS: dict[str, Any] = {
    "int8": "fastinfer.quantization.int8:Int8",
    "int4": "fastinfer.quantization.int4:Int4",
    "gguf": "fastinfer.quantization.gguf:GGUF",
    "w4a8": "fastinfer.quantization.w4a8:W4A8",
}


def register_method(name: str, method: QuantMethod | type[QuantMethod] | str) -> None:
    """Make ``quantization=name`` (and whatever ``method.parse`` accepts) mean ``method``: an instance, a
    :class:`QuantMethod` subclass or a ``"module:Class"`` string. Re-registering a name replaces it."""
    if not isinstance(name, str) or not name:
        raise ValueError("register_method: name must be a non-empty string")
    _METHODS[name] = method


def unregister_method(name: str) -> None:
    _METHODS.pop(name, None)


def supported_methods() -> tuple[str, ...]:
    return tuple(_METHODS)


def get_method(name: str) -> QuantMethod:
    """The registered method ``name`` (a method name, not a spec: "int4", not "int4-g32")."""
    entry = _METHODS.get(name)
    if entry is None:
        raise ValueError(f"unknown quantization method {name!r}; registered: {', '.join(_METHODS)}")
    if isinstance(entry, str):
        module, _, cls = entry.partition(":")
        entry = getattr(importlib.import_module(module), cls)
    if isinstance(entry, type):
        entry = entry()
    if not isinstance(entry, QuantMethod):
        raise TypeError(f"quantization method {name!r} is {entry!r}, not a QuantMethod")
    _METHODS[name] = entry
    return entry


def parse_method(spec: str | None) -> QuantSpec:
    """``None``/"int8"/"int4"/"int4-g32"/"int4-g64"/"int4-g128"/"gguf" (or a registered method's spelling) ->
    (method, group_size). "gguf" keeps a GGUF file's quantized tensors as they are (lossless) and leaves
    its float tensors float. Imports no torch."""
    if spec is None:
        return QuantSpec(None, None)
    if isinstance(spec, str) and spec:
        for name in _METHODS:
            parsed = get_method(name).parse(spec)
            if parsed is not None:
                return parsed
    choices = [s for name in _METHODS for s in (get_method(name).spellings or (name,))]
    raise ValueError(f"quantization={spec!r} is not supported; choose {', '.join(choices[:-1])} or {choices[-1]}")


def method_of(spec: str | None) -> QuantMethod | None:
    """The method a ``quantization=`` string names (None for None)."""
    name = parse_method(spec).method
    return None if name is None else get_method(name)


def resolve_method(spec: str | None, group_size: int | None = None) -> tuple[QuantMethod, int | None]:
    """The method a ``quantization=`` string names and the group size to use (``group_size`` if given, else the
    spec's own, e.g. 32 for "int4-g32"; None: the method's rule per layer). ValueError for no or an unknown method."""
    parsed = parse_method(spec)
    if parsed.method is None:
        raise ValueError("a quantization method is required here, got None")
    return get_method(parsed.method), group_size or parsed.group_size


def method_for(qw: QuantizedWeight) -> QuantMethod:
    """The method that applies a weight in the shared format whose method is not known (a tensor loaded from a
    file): int8 or int4 by its bits."""
    return get_method("int8" if qw.bits == 8 else "int4")
