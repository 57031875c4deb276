"""Model quality measurements on a loaded model: perplexity over a long text (the quantization gate)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastinfer.models.interface import CausalLM, forward_sequence, scratch_kv_cache


@dataclass
class Perplexity:
    perplexity: float
    nll_sum: float
    num_predicted: int


def perplexity(model: CausalLM, token_ids: list[int], window: int = 1024, block_size: int = 16,
               kv_cache_dtype: str = "auto") -> Perplexity:
    """Perplexity of ``token_ids`` in non-overlapping windows of ``window`` tokens (each window starts with an
    empty context and scores its tokens 2..window, as the usual chunked evaluation does). Runs the model
    through its own paged-attention path with a temporary KV cache of one window, then rebinds the caches
    the model had (so an engine that owns the model keeps working). ``kv_cache_dtype``: that cache's
    ("int8" / "fp8_e4m3": quantized K and V, as an engine with that setting keeps them)."""
    if window < 2:
        raise ValueError("window must be at least 2 tokens")
    nll, count = 0.0, 0
    with scratch_kv_cache(model, window, block_size, kv_cache_dtype), torch.inference_mode():
        for start in range(0, len(token_ids) - 1, window):
            ids = token_ids[start:start + window]
            if len(ids) < 2:
                break
            hidden = forward_sequence(model, ids, block_size)  # [n, hidden]
            logits = model.compute_logits(hidden[:-1])  # [n - 1, vocab] fp32
            nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
            count += len(ids) - 1
    return Perplexity(math.exp(nll / count), nll, count)
