"""``SamplingParams.prompt_logprobs``: every prompt position's logprob, rank and top-k equal HF transformers'
teacher-forced log-softmax (fp32), whole or in chunks, with a prefix-cache hit available, with n > 1 and after
preemption."""
from __future__ import annotations

import pytest
import torch

from fastinfer import SamplingParams

PROMPT = ("The history of the printing press begins in the fifteenth century, when a goldsmith in Mainz "
          "combined movable metal type with an oil-based ink")


@pytest.fixture(scope="module")
def hf_logprobs(tiny_model_dir, tiny_llm):
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32).eval()
    ids = tiny_llm("llama").get_tokenizer().encode(PROMPT)
    with torch.no_grad():
        lps = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return ids, lps


def _check(out, hf, k):
    ids, lps = hf
    assert out.prompt_token_ids == ids
    plp = out.prompt_logprobs
    assert plp is not None and len(plp) == len(ids) and plp[0] is None
    for i in range(1, len(ids)):
        row, ref = plp[i], lps[i - 1]
        tok = ids[i]
        assert tok in row
        assert row[tok].logprob == pytest.approx(ref[tok].item(), abs=1e-4)
        assert row[tok].rank == int((ref > ref[tok]).sum()) + 1
        top = ref.topk(k)
        want = dict(zip(top.indices.tolist(), top.values.tolist()))
        got = {t: lp for t, lp in row.items() if lp.rank <= k}
        assert set(got) == set(want), i
        for t, v in want.items():
            assert got[t].logprob == pytest.approx(v, abs=1e-4)
        assert len(row) in (k, k + 1)  # the top k, plus the prompt token when it is not among them


@pytest.mark.parametrize("kw", [{}, {"max_num_batched_tokens": 7}], ids=["whole", "chunked"])
def test_prompt_logprobs_equal_hf(tiny_llm, hf_logprobs, kw):
    llm = tiny_llm("llama", **kw)
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=3), use_tqdm=False)[0]
    _check(out, hf_logprobs, 3)
    assert len(out.outputs[0].token_ids) == 3


def test_prompt_logprobs_with_a_prefix_cache_hit_n2_and_preemption(tiny_llm, hf_logprobs):
    llm = tiny_llm("llama", block_size=4)
    warm = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)[0]
    assert warm.prompt_logprobs is None
    hits = llm.engine.kv.prefix_hits
    out = llm.generate([PROMPT], SamplingParams(n=2, temperature=0, max_tokens=4, prompt_logprobs=2),
                       use_tqdm=False)[0]
    _check(out, hf_logprobs, 2)  # every position, though the prompt's blocks were cached
    assert llm.engine.kv.prefix_hits == hits  # it computed them instead of reading the cache
    again = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)[0]
    assert again.num_cached_tokens > 0  # others still hit
    tight = tiny_llm("llama", num_kv_blocks=16, block_size=4, max_model_len=64)
    outs = tight.generate([PROMPT, PROMPT + " and paper"],
                          [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, prompt_logprobs=2),
                           SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)], use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions > 0
    _check(outs[0], hf_logprobs, 2)


def test_prompt_logprobs_zero_gives_the_prompt_token_only(tiny_llm, hf_logprobs):
    out = tiny_llm("llama").generate([PROMPT], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    ids, lps = hf_logprobs
    assert all(list(row) == [t] for row, t in zip(out.prompt_logprobs[1:], ids[1:]))
    assert out.prompt_logprobs[5][ids[5]].logprob == pytest.approx(lps[4][ids[5]].item(), abs=1e-4)
