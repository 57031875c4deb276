"""logit_bias, allowed_token_ids and bad words: the sampler's batched version equals a per-row plain-Python
reference (mixed rows, odd vocab, out-of-range ids ignored), applies on fake CUDA tensors without device
mismatches, and the engine range-checks ids against the vocabulary and tokenizes bad words."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastinfer import SamplingParams
from fastinfer.core.request import Request
from fastinfer.worker.sampler import apply_penalties, sample

V = 37


def _req(rid, outputs=(), bad_ids=None, **kw):
    sp = SamplingParams(**kw)
    if bad_ids is not None:
        sp = dataclasses.replace(sp, bad_words_token_ids=bad_ids)
    r = Request(rid, [1, 2], sp)
    for t in outputs:
        r.append_output_token(t)
    return r


def _reference(logits: torch.Tensor, reqs) -> torch.Tensor:
    out = logits.clone()
    for i, r in enumerate(reqs):
        sp = r.sampling_params
        for w in sp.bad_words_token_ids or []:
            k = len(w) - 1
            if k == 0 or r.output_token_ids[-k:] == w[:-1]:
                out[i, w[-1]] = float("-inf")
        if sp.allowed_token_ids:
            keep = torch.zeros(V, dtype=torch.bool)
            keep[[t for t in sp.allowed_token_ids if t < V]] = True
            out[i][~keep] = float("-inf")
        for t, b in (sp.logit_bias or {}).items():
            if t < V:
                out[i, t] += b
    return out


REQS = [
    lambda: _req("plain"),
    lambda: _req("bias", logit_bias={3: 5.0, 36: -100, 40: 2.0}),
    lambda: _req("allowed", allowed_token_ids=[0, 7, 36, 99]),
    lambda: _req("both", allowed_token_ids=[4, 5], logit_bias={5: -1.5, "4": 0.25}),
    lambda: _req("bad", outputs=[8, 9], bad_ids=[[11], [9, 12], [8, 13], [8, 9, 14], [9, 9, 15]]),
]


def test_logit_rules_equal_the_reference():
    torch.manual_seed(0)
    reqs = [f() for f in REQS]
    logits = torch.randn(len(reqs), V)
    got = logits.clone()
    apply_penalties(got, reqs)
    torch.testing.assert_close(got, _reference(logits, reqs), rtol=0, atol=0)
    assert got[4, 11] == float("-inf") and got[4, 12] == float("-inf") and got[4, 14] == float("-inf")
    assert got[4, 13] != float("-inf") and got[4, 15] != float("-inf")


def test_greedy_follows_the_rules():
    logits = torch.zeros(3, V)
    logits[:, 0] = 10
    reqs = [_req("b", temperature=0, logit_bias={6: 100}), _req("a", temperature=0, allowed_token_ids=[30, 31]),
            _req("w", temperature=0, bad_ids=[[0]])]
    logits[1, 31] = 1
    assert sample(logits, reqs).to_lists().token_ids == [6, 31, int(logits[2, 1:].argmax()) + 1]


def test_logit_rules_trace_on_fake_cuda_tensors():
    reqs = [f() for f in REQS]
    with FakeTensorMode(allow_non_fake_inputs=False):
        logits = torch.empty(len(reqs), V, device="cuda")
        apply_penalties(logits, reqs)
        assert logits.device.type == "cuda"


@pytest.mark.parametrize("kw, needle", [
    ({"logit_bias": {10**7: 1.0}}, "logit_bias has token ids outside"),
    ({"allowed_token_ids": [1, 10**7]}, "allowed_token_ids has token ids outside"),
])
def test_engine_range_checks_ids(tiny_llm, kw, needle):
    llm = tiny_llm("llama")
    with pytest.raises(ValueError, match=needle):
        llm.engine.add_request("x", "hello", SamplingParams(**kw))
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("kw, needle", [
    ({"logit_bias": {1: 101}}, r"logit_bias\[1\] must be a number in \[-100, 100\]"),
    ({"logit_bias": {"x": 1}}, "logit_bias keys must be token ids"),
    ({"logit_bias": {-1: 1}}, "logit_bias keys must be token ids"),
    ({"logit_bias": {i: 1.0 for i in range(1025)}}, "at most 1024"),
    ({"allowed_token_ids": []}, "allowed_token_ids must be a non-empty list"),
    ({"bad_words": ["x" * 300]}, "bad_words must be a list"),
])
def test_bad_values_are_precise_errors(kw, needle):
    with pytest.raises(ValueError, match=needle):
        SamplingParams(**kw)


def test_engine_bad_words_and_bias_end_to_end(tiny_llm):
    llm = tiny_llm("llama")
    tok = llm.get_tokenizer()
    base = llm.generate(["Paris is"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    word = tok.decode(base.token_ids[3:5])  # a word the model would produce
    out = llm.generate(["Paris is"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, bad_words=[word]),
                       use_tqdm=False)[0].outputs[0]
    banned = [tok.encode(w, add_special_tokens=False) for w in (word.lstrip(), " " + word.lstrip())]
    toks = out.token_ids
    for b in banned:
        assert not any(toks[i:i + len(b)] == b for i in range(len(toks))), (word, b, toks)
    assert toks[:3] == base.token_ids[:3] and toks != base.token_ids
    forced = llm.generate(["Paris is"], SamplingParams(temperature=0, max_tokens=4, logit_bias={"77": 100}),
                          use_tqdm=False)[0].outputs[0]
    assert forced.token_ids == [77] * 4
