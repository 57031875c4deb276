"""The int8 KV cache's quality gate on the real SmolLM2-135M (the embedded GGUF): perplexity on English prose within
0.5% of the float KV cache, next-token distributions close to the float cache's, and greedy continuations that
agree with the float cache's. Queries and keys go through the cache's Hadamard rotation
(fastinfer.layers.kv_rotation); measured with it (without it): mean KL 1.7e-4 (5.1e-4), teacher-forced top-1 0.994
(0.991). Gemma 3 270M, measured by the same function and recorded in benchmarks/RESULTS.md, is not in CI for time:
mean KL 6.6e-4 (4.7e-3), teacher-forced 0.994 (0.972), free-running agreement 0.83 (0.36).

Agreement: the issue asks that greedy outputs of 5 prompts x 64 tokens agree with the float KV cache's on at least
95% of positions before the first divergence (``agreement``: the positions before each prompt's first differing
token, over 5 x 64). That number is not a stable gate: int8 KV flips about 0.5% of near-tied top-1 tokens (fastinfer
verify: top-1 0.995), so whether a prompt diverges inside 64 tokens is luck, and which near-tie flips depends on
the fp32 summation order (threads, ISA): the same gate measured 97.8% in one run and 86.6% (one prompt diverging
at token 21) in CI, and 81.9% with the rotation (one prompt at token 16) although every other measure improved. The
test therefore asserts the forms with no cascade: the mean KL over the test text's first 512 tokens, and along the
float cache's own greedy continuation the int8 cache's argmax equals the float cache's token at >= 98% of the 320
positions; the free-running agreement is computed and printed (benchmarks/RESULTS.md records it)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastinfer import LLM, SamplingParams
from fastinfer.verify import position_stats
from tests.models.test_smollm2_gguf import PROMPTS as SMOLLM2_PROMPTS

# every test here runs the real model for tens of seconds: slow (tests/conftest.py starts slow files first)
pytestmark = pytest.mark.slow

TEXT = Path(__file__).resolve().parents[1] / "data" / "python_docs_prose.txt"
PROMPTS = SMOLLM2_PROMPTS[:5]  # the SmolLM2 vs HF test's prompts
NEW_TOKENS = 64
KL_TOKENS = 512  # mean KL of the int8 cache's next-token distributions to the float cache's, teacher-forced
PPL_TOKENS = 1024  # the test text's first 1024-token window (measured: -0.11%; 2048 tokens: +0.11%, 2.5x the time)


def first_divergence(a: list[int], b: list[int]) -> int:
    """Index of the first position where ``a`` and ``b`` differ (their common length when none does)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def agreement(ours: list[list[int]], ref: list[list[int]], length: int) -> float:
    """Positions before each prompt's first divergence, over all positions (see the module docstring)."""
    return sum(first_divergence(a, b) for a, b in zip(ours, ref)) / (length * len(ref))


def mean_kl(ref_llm: LLM, llm: LLM, ids: list[int]) -> float:
    """Mean KL(ref || ours) of the next-token distributions at every position of ``ids`` (fastinfer verify's)."""
    return position_stats(ref_llm.prompt_logits(ids), llm.prompt_logits(ids))["kl"].mean().item()


def test_agreement_metric():
    assert agreement([[1, 2, 3, 4]], [[1, 2, 3, 4]], 4) == 1.0
    assert agreement([[1, 2, 9, 4], [5, 6, 7, 8]], [[1, 2, 3, 4], [5, 6, 7, 8]], 4) == 6 / 8  # 4 after position 2
    assert agreement([[9, 2, 3, 4]], [[1, 2, 3, 4]], 4) == 0.0


def _engines(model: str) -> tuple[LLM, LLM]:
    # float32: the float KV cache's own greedy path is then deterministic enough to compare against (in bf16 the
    # model's rounding alone flips near-tied tokens: int8 vs bf16 KV agreed on 52% of positions, fp32 98%)
    kw = dict(dtype="float32", max_model_len=1024, load_progress=False, enable_prefix_caching=False)
    return LLM(model, **kw), LLM(model, kv_cache_dtype="int8", **kw)


def _quality_gate(model: str, prompts: list[str], max_kl: float = 3e-4) -> None:
    from fastinfer.evaluate import perplexity

    float_llm, int8_llm = _engines(model)
    ids = float_llm.get_tokenizer().encode(TEXT.read_text())[:PPL_TOKENS]
    assert len(ids) == PPL_TOKENS
    net = float_llm.engine.worker.model
    ppl_float = perplexity(net, ids, window=1024).perplexity
    ppl_int8 = perplexity(net, ids, window=1024, kv_cache_dtype="int8").perplexity
    assert abs(ppl_int8 / ppl_float - 1) < 0.005, (ppl_float, ppl_int8)
    assert ppl_int8 != ppl_float  # the scratch cache really was int8
    kl = mean_kl(float_llm, int8_llm, ids[:KL_TOKENS])

    sp = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = float_llm.generate(prompts, sp, use_tqdm=False)
    ref = [o.outputs[0].token_ids for o in outs]
    ours = [o.outputs[0].token_ids for o in int8_llm.generate(prompts, sp, use_tqdm=False)]
    assert all(len(t) == NEW_TOKENS for t in ref + ours)
    hits = 0
    for o, cont in zip(outs, ref):  # teacher-forced along the float cache's continuation
        seq = list(o.prompt_token_ids) + list(cont)
        picks = int8_llm.prompt_logits(seq).argmax(-1).tolist()[len(o.prompt_token_ids) - 1:-1]
        hits += sum(int(a == b) for a, b in zip(picks, cont))
    forced = hits / (NEW_TOKENS * len(ref))
    free = agreement(ours, ref, NEW_TOKENS)
    print(f"{model}: perplexity {ppl_float:.4f} float KV, {ppl_int8:.4f} int8 KV; mean KL {kl:.2e}; "
          f"teacher-forced top-1 agreement {forced:.4f}; free-running agreement {free:.4f}, first divergences "
          f"{[first_divergence(a, b) for a, b in zip(ours, ref)]}")
    assert forced >= 0.98, forced
    assert kl < max_kl, kl


def test_int8_kv_quality_gate(smollm2_path):
    _quality_gate(smollm2_path, PROMPTS)


def test_keys_with_outlier_channels_keep_their_precision(tmp_path, smollm2_tokenizer_dir):
    """A tiny Llama whose keys carry one huge channel pair per KV head (post-RoPE keys have such outliers): a
    per-row int8 scale set by the outlier would round every other channel to a few levels; the Hadamard rotation
    of q and k (fastinfer.layers.kv_rotation) spreads it, so the int8 cache's next-token distributions stay close
    to the float cache's (measured mean KL 6.8e-5 with the rotation, 1.2e-3 without)."""
    import transformers

    from tests.conftest import _tiny_config, save_tiny_model

    torch.manual_seed(0)
    cfg = _tiny_config("llama")
    cfg.head_dim = 64  # the rotation's gain grows with the head size (SmolLM2's 64, Gemma 3's 256)
    model = transformers.LlamaForCausalLM(cfg).float()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
        d = cfg.head_dim
        for layer in model.model.layers:
            w = layer.self_attn.k_proj.weight  # [Hkv * D, hidden]; channels c and c + D/2 rotate together
            for h in range(model.config.num_key_value_heads):
                w[h * d + 1] *= 40
                w[h * d + 1 + d // 2] *= 40
    path = save_tiny_model(model, tmp_path / "outliers", smollm2_tokenizer_dir)
    kw = dict(dtype="float32", max_model_len=256, load_progress=False, enable_prefix_caching=False)
    float_llm = LLM(path, **kw)
    ids = float_llm.get_tokenizer().encode(TEXT.read_text())[:200]
    kl = mean_kl(float_llm, LLM(path, kv_cache_dtype="int8", **kw), ids)
    print(f"key outliers: mean KL int8 vs float KV {kl:.2e}")
    assert 0 < kl < 3e-4, kl
