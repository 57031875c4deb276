"""Beam search: width 1 is greedy; width 4 equals a plain-torch reference beam search (full recompute of
every candidate sequence, full-vocabulary expansion)."""
from __future__ import annotations

import torch

from fastinfer import SamplingParams
from fastinfer.beam_search import BeamSearchParams

PROMPTS = ["The history of the printing press", "def add(a, b):"]


def reference_beam_search(model, prompt_ids, width, steps):
    """HF-style: keep the ``width`` best extensions (by cumulative logprob) over the whole vocabulary."""
    beams = [([], 0.0)]
    for _ in range(steps):
        cands = []
        for toks, cum in beams:
            with torch.inference_mode():
                logits = model(torch.tensor([prompt_ids + toks])).logits[0, -1].float()
            lp = logits.log_softmax(-1)
            top = lp.topk(width)
            cands += [(toks + [t], cum + v) for t, v in zip(top.indices.tolist(), top.values.tolist())]
        beams = sorted(cands, key=lambda c: -c[1])[:width]
    return beams


def test_width_one_is_greedy(tiny_llm):
    llm = tiny_llm("llama")
    greedy = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    beams = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=1, max_tokens=8, ignore_eos=True))
    assert [b.sequences[0].tokens for b in beams] == [g.outputs[0].token_ids for g in greedy]


def test_width_four_matches_reference(tiny_llm, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32).eval()
    llm = tiny_llm("llama", block_size=4)
    tok = llm.get_tokenizer()
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        want = reference_beam_search(hf, ids, 4, 6)
        got = llm.beam_search(prompt, BeamSearchParams(beam_width=4, max_tokens=6, ignore_eos=True,
                                                       length_penalty=0.0))[0].sequences
        assert [s.tokens for s in got] == [w[0] for w in want]
        for s, w in zip(got, want):
            assert abs(s.cum_logprob - w[1]) < 1e-3
    hits = llm.engine.kv.prefix_hits
    assert hits > 0  # beams reuse their shared history through the prefix cache


def test_best_of_returns_most_likely_samples(tiny_llm):
    llm = tiny_llm("llama")
    sp = SamplingParams(n=2, best_of=5, temperature=1.0, seed=3, max_tokens=6, ignore_eos=True)
    out = llm.generate("Pick the best", sp, use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1] and out.outputs[0].logprobs is None
    every = llm.generate("Pick the best", SamplingParams(n=5, temperature=1.0, seed=3, max_tokens=6,
                                                          ignore_eos=True, logprobs=0), use_tqdm=False)[0]
    ranked = sorted(every.outputs, key=lambda o: -o.cumulative_logprob)[:2]
    assert [o.token_ids for o in out.outputs] == [o.token_ids for o in ranked]
