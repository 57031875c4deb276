"""HF ``architectures`` name -> model class. Adding a family is one file plus one line here (or one
:func:`register_model` call from user code). Entries are ``"module:Class"`` strings so that reading the
registry (config validation, ``supported_architectures``) imports no torch.

Every other architecture transformers knows as a causal LM is served by the generic path
(:mod:`fastinfer.models.transformers_impl`: transformers' own modules with fastinfer's paged attention), chosen by
:func:`choose_impl` (``model_impl``: "auto" picks the native class when there is one)."""
from __future__ import annotations

import importlib
from typing import Any

_MODELS: dict[str, Any] = {
    "LlamaForCausalLM": "fastinfer.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "fastinfer.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "fastinfer.models.llama:LlamaForCausalLM",
    "Qwen3ForCausalLM": "fastinfer.models.qwen3:Qwen3ForCausalLM",
    "Phi3ForCausalLM": "fastinfer.models.llama:LlamaForCausalLM",
    "GPT2LMHeadModel": "fastinfer.models.gpt2:GPT2LMHeadModel",
    "GPTNeoXForCausalLM": "fastinfer.models.gpt_neox:GPTNeoXForCausalLM",
    "Gemma2ForCausalLM": "fastinfer.models.gemma:Gemma2ForCausalLM",
    "Gemma3ForCausalLM": "fastinfer.models.gemma:Gemma3ForCausalLM",
    "MixtralForCausalLM": "fastinfer.models.moe:MixtralForCausalLM",
    "Qwen2MoeForCausalLM": "fastinfer.models.moe:Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM": "fastinfer.models.moe:Qwen3MoeForCausalLM",
    "OlmoeForCausalLM": "fastinfer.models.moe:OlmoeForCausalLM",
}
_GENERIC = "fastinfer.models.transformers_impl:TransformersForCausalLM"
MODEL_IMPLS = ("auto", "fastinfer", "transformers")


def register_model(architecture: str, model_cls: Any) -> None:
    """Serve checkpoints whose ``config.json`` names ``architecture`` with ``model_cls`` (a class on the
    :class:`fastinfer.models.interface.CausalLM` protocol, or a ``"module:Class"`` string)."""
    if not isinstance(architecture, str) or not architecture:
        raise ValueError("register_model: architecture must be a non-empty string")
    _MODELS[architecture] = model_cls


def supported_architectures() -> tuple[str, ...]:
    return tuple(_MODELS)


def is_supported(architecture: str) -> bool:
    return architecture in _MODELS


def transformers_causal_lms() -> set[str]:
    """The causal-LM class names of the installed transformers (imported lazily: it loads torch)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([v] if isinstance(v, str) else v)
    return names


def choose_impl(architecture: str, model_impl: str = "auto", remote_code: bool = False) -> str:
    """"fastinfer" (the native class) or "transformers" (the generic path) for ``architecture``, following
    ``model_impl`` ("auto": native when registered, else generic); ValueError when neither can serve it."""
    if model_impl not in MODEL_IMPLS:
        raise ValueError(f"model_impl must be one of {MODEL_IMPLS}, got {model_impl!r}")
    native = is_supported(architecture)
    if model_impl == "fastinfer" or (model_impl == "auto" and native):
        if not native:
            raise ValueError(f"model_impl='fastinfer': no native class for {architecture!r} (native: "
                             f"{', '.join(supported_architectures())}); model_impl='auto' or 'transformers' "
                             "serves it with transformers' own modules")
        return "fastinfer"
    if remote_code:
        raise ValueError(f"{architecture!r} comes with the checkpoint's own modelling code (auto_map); fastinfer "
                         "never runs remote code (trust_remote_code)")
    if architecture not in transformers_causal_lms():
        import transformers

        raise ValueError(f"unsupported architecture {architecture!r}: no native class (fastinfer supports "
                         f"{', '.join(supported_architectures())}) and transformers {transformers.__version__} "
                         "has no causal-LM class of that name for the generic path")
    return "transformers"


def resolve_model_class(architecture: str, model_impl: str = "fastinfer") -> Any:
    """The class for ``architecture`` (the generic class for ``model_impl="transformers"``); ValueError naming
    the supported ones otherwise."""
    if model_impl == "transformers":
        return _load(_GENERIC)
    entry = _MODELS.get(architecture)
    if entry is None:
        raise ValueError(f"unsupported architecture {architecture!r}; fastinfer supports "
                         f"{', '.join(supported_architectures())}")
    if isinstance(entry, str):
        entry = _MODELS[architecture] = _load(entry)
    return entry


def _load(entry: str) -> Any:
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)
