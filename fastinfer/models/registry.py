"""HF ``architectures`` name -> model class. Adding a family is one file plus one line here (or one
:func:`register_model` call from user code). Entries are ``"module:Class"`` strings so that reading the
registry (config validation, ``supported_architectures``) imports no torch."""
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
}


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


def resolve_model_class(architecture: str) -> Any:
    """The class for ``architecture``; ValueError naming the supported ones otherwise."""
    entry = _MODELS.get(architecture)
    if entry is None:
        raise ValueError(f"unsupported architecture {architecture!r}; fastinfer supports "
                         f"{', '.join(supported_architectures())}")
    if isinstance(entry, str):
        module, _, name = entry.partition(":")
        entry = getattr(importlib.import_module(module), name)
        _MODELS[architecture] = entry
    return entry
