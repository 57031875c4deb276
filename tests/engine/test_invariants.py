"""Engine invariants on a tiny model (fp32): batching, chunking and preemption never change results;
seeded sampling does not depend on batch mates; stop rules, n > 1, logprobs, bad input."""
from __future__ import annotations

import pytest

from fastinfer import SamplingParams

PROMPTS = [
    "The history of the printing press begins in",
    "def add(a, b):",
    "Paris is",
    "In 1492, a sailor set out across the ocean and after many weeks at sea",
    "1, 2, 3, 4,",
    "A",
]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def llm(tiny_llm):
    return tiny_llm("llama")


@pytest.fixture(scope="module")
def reference(llm):
    """Each prompt alone."""
    return [_tokens(llm.generate([p], GREEDY, use_tqdm=False))[0] for p in PROMPTS]


def test_batched_equals_one_at_a_time(llm, reference):
    assert _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference
    assert all(len(t) == 24 for t in reference)


def test_chunked_prefill_equals_whole_prefill(tiny_llm, reference):
    small = tiny_llm("llama", max_num_batched_tokens=5)  # every prompt above spans several chunks
    assert _tokens(small.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference


def test_preempted_run_equals_uninterrupted(tiny_llm, reference):
    tight = tiny_llm("llama", num_kv_blocks=14, block_size=4, max_model_len=48)
    outs = tight.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions > 0
    assert _tokens(outs) == reference
    assert tight.engine.kv.pool.num_free_blocks == 14


def test_seeded_sample_independent_of_batch_mates_and_preemption(llm, tiny_llm):
    sp = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=16, ignore_eos=True)
    alone = _tokens(llm.generate([PROMPTS[0]], sp, use_tqdm=False))[0]
    mates = [SamplingParams(temperature=0.7, max_tokens=10)] * (len(PROMPTS) - 1)
    batched = llm.generate([PROMPTS[0]] + PROMPTS[1:], [sp] + mates, use_tqdm=False)
    assert batched[0].outputs[0].token_ids == alone
    tight = tiny_llm("llama", num_kv_blocks=14, block_size=4, max_model_len=48)
    pre = tight.generate([PROMPTS[0]] + PROMPTS[1:], [sp] + mates, use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions > 0
    assert pre[0].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.95, seed=99, max_tokens=16, ignore_eos=True)
    assert _tokens(llm.generate([PROMPTS[0]], other_seed, use_tqdm=False))[0] != alone


def test_n_samples_are_distinct_and_reproducible(llm):
    sp = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True)
    a = llm.generate(PROMPTS[2], sp, use_tqdm=False)[0]
    b = llm.generate(PROMPTS[2], sp, use_tqdm=False)[0]
    assert [o.index for o in a.outputs] == [0, 1, 2]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) == 3


def test_stop_string_spanning_tokens_is_cut_and_never_streamed(llm):
    base = llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)[0].outputs[0]
    tok = llm.get_tokenizer()
    pieces = [tok.decode(base.token_ids[:i]) for i in range(len(base.token_ids) + 1)]
    # a stop string made of the end of token 3's text and the start of token 4's: it spans a boundary
    k = next(i for i in range(3, 20) if len(pieces[i]) - len(pieces[i - 1]) >= 2
             and len(pieces[i + 1]) - len(pieces[i]) >= 2)
    stop = pieces[i_end := k][-1:] + pieces[k + 1][len(pieces[k]):][:1]
    cut = base.text.find(stop)
    assert 0 <= cut < len(pieces[i_end])
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])
    out = llm.generate(PROMPTS[0], sp, use_tqdm=False)[0].outputs[0]
    assert out.text == base.text[:cut] and out.finish_reason == "stop" and out.stop_reason == stop
    streamed = [o.outputs[0].text for o in llm.stream(PROMPTS[0], sp)]
    assert streamed[-1] == out.text
    assert all(stop not in t and out.text.startswith(t) for t in streamed)
    keep = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop],
                          include_stop_str_in_output=True)
    assert llm.generate(PROMPTS[0], keep, use_tqdm=False)[0].outputs[0].text == base.text[:cut + len(stop)]


def test_stop_token_ids_max_tokens_and_logprobs(llm, reference):
    ref = reference[0]
    sp = SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[ref[5]], ignore_eos=True)
    out = llm.generate(PROMPTS[0], sp, use_tqdm=False)[0].outputs[0]
    first = ref.index(ref[5])
    assert out.token_ids == ref[:first + 1] and out.finish_reason == "stop" and out.stop_reason == ref[5]
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref[:7] and out.finish_reason == "length"
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 5
    for tid, lp in zip(out.token_ids, out.logprobs):
        assert lp[tid].rank == 1 and len(lp) == 3  # greedy: the sampled token is the top one
        assert lp[tid].logprob == max(v.logprob for v in lp.values())
    assert out.cumulative_logprob == pytest.approx(sum(lp[t].logprob for t, lp in zip(out.token_ids,
                                                                                       out.logprobs)))


def test_bad_prompts_fail_alone(llm, reference):
    too_long = "word " * 600  # > max_model_len=512 tokens
    outs = llm.generate([PROMPTS[0], "", too_long, {"prompt_token_ids": [10**9]}, PROMPTS[1]], GREEDY,
                        use_tqdm=False)
    assert outs[0].outputs[0].token_ids == reference[0] and outs[4].outputs[0].token_ids == reference[1]
    assert "empty" in outs[1].error
    assert "max_model_len" in outs[2].error and outs[2].outputs[0].finish_reason == "error"
    assert "out of range" in outs[3].error
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.kv.pool.num_free_blocks == llm.engine.num_kv_blocks


def test_abort_frees_blocks(llm):
    eng = llm.engine
    eng.add_request("x", PROMPTS[3], SamplingParams(max_tokens=50, ignore_eos=True))
    eng.add_request("y", PROMPTS[0], SamplingParams(n=2, max_tokens=50, ignore_eos=True))
    for _ in range(3):
        eng.step()
    assert eng.kv.usage() > 0
    eng.abort_request(["x", "y"])
    assert not eng.has_unfinished_requests()
    assert eng.kv.pool.num_free_blocks == eng.num_kv_blocks
    with pytest.raises(ValueError, match="duplicate"):
        eng.add_request("z", "a", None)
        eng.add_request("z", "b", None)
    eng.abort_request("z")


def test_chat_uses_the_template(llm):
    out = llm.chat([{"role": "user", "content": "hello"}], GREEDY, use_tqdm=False)[0]
    assert out.prompt.startswith("<|im_start|>") and out.prompt.endswith("<|im_start|>assistant\n")
    assert len(out.outputs[0].token_ids) == 24
    with pytest.raises(ValueError, match="empty"):
        llm.chat([], GREEDY)


@pytest.mark.parametrize("spec", [None, {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1}])
def test_stop_token_text_is_not_part_of_the_output(tiny_llm, spec):
    """As vLLM: the EOS / stop token that ends a sample is in its token ids but not in its text (unless
    include_stop_str_in_output), and with speculation nothing accepted past it reaches the text."""
    llm = tiny_llm("llama", speculative_config=spec)
    tok = llm.get_tokenizer()
    free = llm.generate([PROMPTS[4]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    stop = free[5]
    k = free.index(stop)
    for include in (False, True):
        sp = SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop], skip_special_tokens=False,
                            include_stop_str_in_output=include)
        c = llm.generate([PROMPTS[4]], sp, use_tqdm=False)[0].outputs[0]
        assert c.token_ids == free[:k + 1] and c.finish_reason == "stop" and c.stop_reason == stop
        want = tok.decode(free[:k + 1] if include else free[:k], skip_special_tokens=False)
        assert c.text == want
