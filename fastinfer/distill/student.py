"""Students: draft models made from the teacher (a subset of its layers, optionally a smaller hidden size) or
from a transformers config, saved as HF directories (config.json + model.safetensors + the teacher's tokenizer
files) that ``LLM(DIR)`` and ``speculative_config={"method": "draft_model", "model": DIR}`` load directly.

The teacher is anything the engine loads: an HF directory, a GGUF file or an embedded short name
(``smollm2-135m``, dequantized to float32). Students share the teacher's tokenizer, and the layer students its
embeddings, final norm and head.
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger("fastinfer")
_LAYER = re.compile(r"^(.*\.layers\.)(\d+)(\..*)$")
_TOKENIZER_FILES = ("special_tokens_map.json", "chat_template.jinja", "generation_config.json")


@dataclass
class TeacherWeights:
    """A teacher's HF config dict, its float32 tensors by HF name, and a writer of its tokenizer files."""
    hf_config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    save_tokenizer: Callable[[str], None]

    @property
    def num_layers(self) -> int:
        return int(self.hf_config["num_hidden_layers"])


def load_teacher(model: str) -> TeacherWeights:
    """The weights of ``model`` (a GGUF file / short name, dequantized to float32, or an HF directory)."""
    from safetensors.torch import load_file

    from fastinfer.models.gguf_loader import GGUFFile
    from fastinfer.models.loader import resolve_model_path
    from fastinfer.tokenizer import tokenizer_from_gguf

    path = resolve_model_path(model)
    if path.endswith(".gguf"):
        gguf = GGUFFile(path)
        cfg = gguf.model_config()
        tensors = {}
        for n, w in gguf.tensors(cfg, torch.float32):  # dequantized: plain tensors
            if not isinstance(w, torch.Tensor):
                raise ValueError(f"teacher tensor {n} did not dequantize to a float tensor")
            tensors[n] = w.float().contiguous()
        tok = tokenizer_from_gguf(gguf)
        return TeacherWeights(cfg.to_hf_dict(), tensors, tok.save_pretrained)
    with open(os.path.join(path, "config.json")) as fh:
        hf = json.load(fh)
    tensors = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        tensors.update({n: t.float() for n, t in load_file(f).items()})
    if not tensors:
        raise ValueError(f"teacher {path} has no .safetensors weights")

    def copy_tokenizer(out_dir: str) -> None:
        for f in os.listdir(path):
            if f.startswith("tokenizer") or f in _TOKENIZER_FILES:
                shutil.copy(os.path.join(path, f), out_dir)

    return TeacherWeights(hf, tensors, copy_tokenizer)


def layers_every(num_layers: int, k: int) -> list[int]:
    """Every ``k``-th layer from the first, plus the last (the layer closest to the head): 30 layers, k = 6 ->
    [0, 6, 12, 18, 24, 29]."""
    if not k >= 1:
        raise ValueError(f"layers every k needs k >= 1, got {k}")
    return sorted(set(range(0, num_layers, k)) | {num_layers - 1})


def layer_student(teacher: TeacherWeights, layers: Sequence[int], out_dir: str,
                  hidden_size: int | None = None) -> str:
    """A student of the teacher's ``layers`` (renumbered 0..), its embeddings, final norm, head and tokenizer,
    written to ``out_dir``. ``hidden_size`` below the teacher's projects every weight onto the top principal
    directions of the embedding table (:func:`project_hidden`)."""
    n = teacher.num_layers
    layers = list(layers)
    if not layers or sorted(set(layers)) != layers or layers[0] < 0 or layers[-1] >= n:
        raise ValueError(f"student layers must be distinct, increasing and in [0, {n}), got {layers}")
    renumber = {old: new for new, old in enumerate(layers)}
    tensors: dict[str, torch.Tensor] = {}
    for name, t in teacher.tensors.items():
        m = _LAYER.match(name)
        if m is None:
            tensors[name] = t
        elif int(m.group(2)) in renumber:
            tensors[f"{m.group(1)}{renumber[int(m.group(2))]}{m.group(3)}"] = t
    if not any(_LAYER.match(k) for k in tensors):
        raise ValueError("the teacher's tensors have no '.layers.N.' names: layer students support Llama-style "
                         "checkpoints")
    hf = {**teacher.hf_config, "num_hidden_layers": len(layers)}
    if isinstance(hf.get("layer_types"), list):
        hf["layer_types"] = [hf["layer_types"][i] for i in layers]
    if hidden_size is not None and hidden_size != hf["hidden_size"]:
        tensors, hf = project_hidden(tensors, hf, hidden_size)
    return save_student(tensors, hf, teacher.save_tokenizer, out_dir)


def project_hidden(tensors: dict[str, torch.Tensor], hf: dict[str, Any], hidden_size: int,
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Shrink the residual stream to ``hidden_size`` by an orthonormal basis ``B`` [H, h] of the embedding
    table's top principal directions (truncated SVD of the centred table): every weight reading the stream is
    right-multiplied by ``B``, every weight writing it left-multiplied by ``B^T``, the embeddings (and an untied
    head) become ``E B``. RMSNorm weights become ``diag(B^T diag(g) B) * sqrt(H / h)``: the norm of a
    projected vector is taken over h instead of H entries. An initialisation to train from, not an equal
    model (heads, head size and the MLP width are kept)."""
    big = int(hf["hidden_size"])
    if not 1 <= hidden_size < big:
        raise ValueError(f"a projected hidden size must be in [1, {big}), got {hidden_size}")
    emb = tensors["model.embed_tokens.weight"]
    _, _, vh = torch.linalg.svd(emb - emb.mean(0), full_matrices=False)
    basis = vh[:hidden_size].T.contiguous()  # [H, h]
    scale = math.sqrt(big / hidden_size)
    out = {}
    for name, t in tensors.items():
        if t.dim() == 1 and t.shape[0] == big and name.endswith("norm.weight"):
            out[name] = (basis.square().T @ t) * scale
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            out[name] = basis.T @ t
        elif t.dim() == 2 and t.shape[1] == big:  # embeddings, q/k/v, gate/up, head: they read the stream
            out[name] = t @ basis
        else:
            raise ValueError(f"project_hidden: no rule for {name} {tuple(t.shape)} (Llama-style weights only)")
    return {k: v.contiguous() for k, v in out.items()}, {**hf, "hidden_size": hidden_size}


def config_student(teacher: TeacherWeights, hf_overrides: dict[str, Any], out_dir: str, seed: int = 0) -> str:
    """A randomly initialised student from the teacher's config with ``hf_overrides`` (e.g.
    ``{"num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 512}``) applied, built by transformers;
    the teacher's embeddings (and head) are copied when the hidden size is kept."""
    import transformers

    if "vocab_size" in hf_overrides and hf_overrides["vocab_size"] != teacher.hf_config["vocab_size"]:
        raise ValueError("a draft must keep the teacher's vocabulary (vocab_size)")
    hf = {**teacher.hf_config, **hf_overrides}
    hf.pop("layer_types", None)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(hf)).float()
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if hf.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        if name in tensors and name in teacher.tensors and tensors[name].shape == teacher.tensors[name].shape:
            tensors[name] = teacher.tensors[name].clone()
    return save_student(tensors, hf, teacher.save_tokenizer, out_dir)


def _hf_config(hf: dict[str, Any]) -> Any:
    import transformers

    kw = {k: v for k, v in hf.items() if k not in ("architectures", "model_type", "torch_dtype")}
    cfg = transformers.AutoConfig.for_model(hf["model_type"], **kw)
    cfg.architectures = hf.get("architectures")
    return cfg


def save_student(tensors: dict[str, torch.Tensor], hf: dict[str, Any], save_tokenizer: Callable[[str], None],
                 out_dir: str) -> str:
    """Write config.json, model.safetensors (float32) and the tokenizer files to ``out_dir``."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_tokenizer(out_dir)
    save_file({k: v.float().contiguous() for k, v in tensors.items()}, os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump({**hf, "torch_dtype": "float32"}, fh, indent=1)
    logger.info("student: %d layers, hidden %d, %.1fM parameters -> %s", hf["num_hidden_layers"],
                hf["hidden_size"], sum(v.numel() for v in tensors.values()) / 1e6, out_dir)
    return out_dir


def student_size(model_dir: str) -> dict[str, int]:
    """Parameters and bytes of a saved student's model.safetensors."""
    from safetensors import safe_open

    path = os.path.join(model_dir, "model.safetensors")
    with safe_open(path, "pt") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (safe_open is not iterable)
    return {"parameters": params, "bytes": os.path.getsize(path)}


def training_module(model_dir: str) -> Any:
    """The student in ``model_dir`` as a transformers causal LM (float32, SDPA attention) to train with
    autograd; our engine's model is for inference."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                              attn_implementation="sdpa")
    return model.float()
