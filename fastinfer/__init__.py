"""fastinfer: a small, readable, fast LLM inference engine.

    from fastinfer import LLM, SamplingParams
    llm = LLM("smollm2-135m")
    print(llm.generate("Hello", SamplingParams(max_tokens=32))[0].outputs[0].text)

Importing needs no GPU and no compiled extension; heavy modules load on first use.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastinfer.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineConfig", "LLMEngine"]

if TYPE_CHECKING:
    from fastinfer.config import EngineConfig
    from fastinfer.engine.llm_engine import LLMEngine
    from fastinfer.entrypoints.llm import LLM
    from fastinfer.outputs import CompletionOutput, RequestOutput

_LAZY = {
    "LLM": "fastinfer.entrypoints.llm",
    "LLMEngine": "fastinfer.engine.llm_engine",
    "EngineConfig": "fastinfer.config",
    "RequestOutput": "fastinfer.outputs",
    "CompletionOutput": "fastinfer.outputs",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastinfer' has no attribute {name!r}")
