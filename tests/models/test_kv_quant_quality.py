"""The int8 KV cache's quality gate on the real SmolLM2-135M (the embedded GGUF): perplexity on English prose
within 0.5% of the float KV cache, and greedy continuations that agree with the float cache's.

Agreement metric (the issue's "at least 95% of positions before the first divergence"): for each of 5 prompts x
64 greedy tokens, the positions before its first token that differs from the float KV cache's output count as
agreeing (all 64 when none differs; positions after a divergence continue from another context, so they do not
count); agreement = agreeing positions / (5 x 64), i.e. the mean over prompts of (first differing index) / 64."""
from __future__ import annotations

from pathlib import Path

import pytest

from fastinfer import LLM, SamplingParams
from tests.models.test_smollm2_gguf import PROMPTS as SMOLLM2_PROMPTS

TEXT = Path(__file__).resolve().parents[1] / "data" / "python_docs_prose.txt"
PROMPTS = SMOLLM2_PROMPTS[:5]  # the SmolLM2 vs HF test's prompts
NEW_TOKENS = 64
PPL_TOKENS = 1024  # the test text's first 1024-token window (measured: -0.11%; 2048 tokens: +0.11%, 2.5x the time)


def first_divergence(a: list[int], b: list[int]) -> int:
    """Index of the first position where ``a`` and ``b`` differ (their common length when none does)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def agreement(ours: list[list[int]], ref: list[list[int]], length: int) -> float:
    """Positions before each prompt's first divergence, over all positions (see the module docstring)."""
    return sum(first_divergence(a, b) for a, b in zip(ours, ref)) / (length * len(ref))


def test_agreement_metric():
    assert agreement([[1, 2, 3, 4]], [[1, 2, 3, 4]], 4) == 1.0
    assert agreement([[1, 2, 9, 4], [5, 6, 7, 8]], [[1, 2, 3, 4], [5, 6, 7, 8]], 4) == 6 / 8  # 4 after position 2
    assert agreement([[9, 2, 3, 4]], [[1, 2, 3, 4]], 4) == 0.0


@pytest.fixture(scope="module")
def engines(smollm2_path):
    # float32: the float KV cache's own greedy path is then deterministic enough to compare against (in bf16 the
    # model's rounding alone flips near-tied tokens: int8 vs bf16 KV agreed on 52% of positions, fp32 98%)
    kw = dict(dtype="float32", max_model_len=1024, load_progress=False, enable_prefix_caching=False)
    return LLM(smollm2_path, **kw), LLM(smollm2_path, kv_cache_dtype="int8", **kw)


def test_int8_kv_quality_gate(engines, smollm2_path):
    from fastinfer.evaluate import perplexity
    from fastinfer.models.loader import load_tokenizer

    float_llm, int8_llm = engines
    ids = load_tokenizer(smollm2_path).encode(TEXT.read_text())[:PPL_TOKENS]
    assert len(ids) == PPL_TOKENS
    model = float_llm.engine.worker.model
    ppl_float = perplexity(model, ids, window=1024).perplexity
    ppl_int8 = perplexity(model, ids, window=1024, kv_cache_dtype="int8").perplexity
    assert abs(ppl_int8 / ppl_float - 1) < 0.005, (ppl_float, ppl_int8)
    assert ppl_int8 != ppl_float  # the scratch cache really was int8

    sp = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in float_llm.generate(PROMPTS, sp, use_tqdm=False)]
    ours = [o.outputs[0].token_ids for o in int8_llm.generate(PROMPTS, sp, use_tqdm=False)]
    assert all(len(t) == NEW_TOKENS for t in ref + ours)
    agree = agreement(ours, ref, NEW_TOKENS)
    assert agree >= 0.95, (agree, [first_divergence(a, b) for a, b in zip(ours, ref)])
