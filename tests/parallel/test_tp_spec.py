"""N-gram speculative decoding on 2 CPU ranks: every rank proposes the same drafts (a deterministic lookup over
the same token histories; the scheduler's plan carries them to every rank's verification), so greedy tokens equal
one process's without speculation and seeded sampling equals one process's with it; drafts were verified. A draft
model under tensor parallelism is a clear error."""
from __future__ import annotations

import pytest

from fastinfer import SamplingParams

PROMPTS = ["a b c d a b c d a b c d a b", "one two three one two three one", "hello hello hello hello"]
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
SAMPLED = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=16, ignore_eos=True)


def _run(llm, sp):
    return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, sp, use_tqdm=False)]


def test_tp2_ngram_speculation_equals_tp1(tiny_llm):
    ref = _run(tiny_llm("llama", max_num_seqs=4), GREEDY)
    one = tiny_llm("llama", max_num_seqs=4, speculative_config=NGRAM)
    ref_sampled = _run(one, SAMPLED)
    llm = tiny_llm("llama", max_num_seqs=4, tensor_parallel_size=2, speculative_config=NGRAM)
    assert _run(llm, GREEDY) == ref
    stats = llm.engine.spec_summary()
    assert stats["draft_tokens"] > 0 and stats["accepted_tokens"] > 0
    assert _run(llm, SAMPLED) == ref_sampled
    llm.shutdown()


def test_tp_draft_model_is_a_clear_error(tiny_llm):
    with pytest.raises(ValueError, match="method 'draft_model' is not supported with tensor_parallel_size > 1"):
        tiny_llm("llama", tensor_parallel_size=2, speculative_config={"method": "draft_model"})
