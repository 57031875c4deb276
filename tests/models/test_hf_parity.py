"""Native models vs HF transformers on tiny random models: prefill logits and 32 greedy tokens (fp32)."""
from __future__ import annotations

import pytest
import torch

from fastinfer import SamplingParams
from tests.conftest import TINY_ARCHS

PROMPTS = [
    "The history of the printing press begins",
    "def fibonacci(n):\n    if n < 2:",
    "A short note",
]


def _hf_model(path: str):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m.eval()


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_prefill_logits_match_hf(arch, tiny_model_dir, tiny_llm):
    path = tiny_model_dir(arch)
    hf = _hf_model(path)
    llm = tiny_llm(arch)
    tok = llm.get_tokenizer()
    runner = llm.engine.worker.runner
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        with torch.inference_mode():
            ref = hf(torch.tensor([ids])).logits[0].float()  # [T, V]
        ours = _prefill_logits(llm, ids)
        scale = ref.abs().max().item()
        assert (ours - ref).abs().max().item() <= 1e-4 * max(scale, 1.0), prompt
    assert runner is llm.engine.worker.runner


def _prefill_logits(llm, ids):
    """All-position logits of one prompt through the served model (the public ``LLM.prompt_logits``: the engine's
    model, op set and dtype over a scratch paged KV cache, so the engine's own cache is untouched)."""
    return llm.prompt_logits({"prompt_token_ids": list(ids)})


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_greedy_tokens_match_hf_generate(arch, tiny_model_dir, tiny_llm):
    hf = _hf_model(tiny_model_dir(arch))
    llm = tiny_llm(arch)
    tok = llm.get_tokenizer()
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outs = llm.generate(PROMPTS, sp, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        ids = tok.encode(prompt)
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
        assert out.outputs[0].token_ids == ref, (arch, prompt)
