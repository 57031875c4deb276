"""GrammarState: the bitmask rows it fills for a draft equal the rows of accepting the draft one token at a time
(so verification is lossless), with and without a start tag (structured output after a reasoning block), and
the engine applies the grammar only after the tag."""
from __future__ import annotations

import re

import pytest
import torch

from fastinfer import SamplingParams
from fastinfer.sampling_params import StructuredOutputsParams
from fastinfer.structured_output import GrammarCompiler, GrammarState, new_bitmask

REGEX = r"[0-9]{2}-[a-c]{3}"


@pytest.fixture(scope="module")
def compiler(tiny_llm):
    tok = tiny_llm("llama").get_tokenizer()
    return GrammarCompiler(tok, 49152, [tok.eos_token_id]), tok


def _sequential_rows(compiled, start_ids, history, draft):
    """Row j: the mask after accepting history + draft[:j] one token at a time (a fresh state each time)."""
    rows = []
    for j in range(len(draft) + 1):
        g = GrammarState(compiled, start_ids)
        ok = g.accept(history + draft[:j])
        m = new_bitmask(1, 49152)
        if ok:
            g.fill(m, 0)
        rows.append((ok, m[0].clone()))
    return rows


@pytest.mark.parametrize("tagged", [False, True])
def test_draft_rows_equal_one_token_at_a_time(compiler, tagged):
    comp, tok = compiler
    compiled = comp.compile(StructuredOutputsParams(regex=REGEX))
    tag = tok.encode(" so ok", add_special_tokens=False) if tagged else None  # two tokens
    ids = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    lead = (ids("hmm") + tag) if tagged else []
    cases = [([], lead + ids("12-ab")), ([], lead + ids("12-xx")), (lead + ids("1"), ids("2-abc")),
             ([], ids("nothing here at all"))]
    if tagged:
        cases += [(ids("hm"), tag + ids("45-c")), (ids("hm") + tag[:1], tag[1:] + ids("4"))]
    for history, draft in cases:
        g = GrammarState(compiled, tag)
        assert g.accept(history)
        got = new_bitmask(len(draft) + 1, 49152)
        g.fill_with_draft(got, 0, draft)
        want = _sequential_rows(compiled, tag, history, draft)
        for j, (ok, row) in enumerate(want):
            if not ok:  # past a token the grammar rejects: verification stops there, the row is free
                break
            assert torch.equal(got[j], row), (history, draft, j)
        # the state itself did not move: filling again gives the same rows
        again = new_bitmask(len(draft) + 1, 49152)
        g.fill_with_draft(again, 0, draft)
        assert torch.equal(again, got)


def test_engine_applies_the_grammar_after_the_tag(tiny_llm):
    llm = tiny_llm("llama")
    tok = llm.get_tokenizer()
    free = llm.generate(["Paris is"], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids
    tag = tok.decode(free[:3])
    assert tok.encode(tag, add_special_tokens=False) == free[:3]  # the tag round-trips to the same tokens
    so = StructuredOutputsParams(regex=REGEX, reasoning_end=tag)
    sp = SamplingParams(temperature=0, max_tokens=20, structured_outputs=so)
    out = llm.generate(["Paris is"], sp, use_tqdm=False)[0].outputs[0]
    assert out.token_ids[:3] == free[:3]  # unconstrained until the tag
    assert re.fullmatch(REGEX, tok.decode(out.token_ids[3:], skip_special_tokens=True)), out.text
    spec = tiny_llm("llama", speculative_config={"method": "ngram", "num_speculative_tokens": 4,
                                                 "prompt_lookup_min": 1})
    assert spec.generate(["Paris is"], sp, use_tqdm=False)[0].outputs[0].token_ids == out.token_ids
