"""Structured outputs in the engine (xgrammar): every output of SmolLM2 under a JSON schema, JSON object, regex,
choice or EBNF grammar parses and validates; the grammar keeps batching, chunked prefill, preemption, the prefix
cache, n > 1 and speculation exact (same tokens as the grammar alone); bad grammars are precise errors that
touch no other request; a grammar that cannot finish ends with "length"."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from fastinfer import LLM, SamplingParams
from fastinfer.sampling_params import StructuredOutputsParams

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "height_m": {"type": "number", "minimum": 0.5, "maximum": 2.5},
        "role": {"type": "string", "enum": ["admin", "user", "guest"]},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "height_m", "role", "address", "tags"],
    "additionalProperties": False,
}
PROMPTS = ["Return a JSON record of a person who lives in Paris:", "A JSON description of a user account:",
           "Here is the data as JSON:"]


def greedy(so: StructuredOutputsParams, max_tokens: int = 160, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, structured_outputs=so, **kw)


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return LLM(smollm2_path, dtype="float32", max_model_len=1024, load_progress=False)


def test_json_schema_outputs_validate(smollm2):
    sps = [greedy(StructuredOutputsParams(json=PERSON)),
           SamplingParams(temperature=0.8, seed=3, max_tokens=160,
                          structured_outputs=StructuredOutputsParams(json=json.dumps(PERSON)))]
    for out in smollm2.generate(PROMPTS, [sps[0], sps[1], sps[0]], use_tqdm=False):
        c = out.outputs[0]
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), PERSON)


def test_compact_json_object_regex_choice_and_grammar(smollm2):
    cases = [
        (StructuredOutputsParams(json=PERSON, disable_any_whitespace=True),
         lambda t: jsonschema.validate(json.loads(t), PERSON) or " " not in t.replace('": "', "").split('"')[0]),
        (StructuredOutputsParams(json_object=True), lambda t: isinstance(json.loads(t), dict)),
        (StructuredOutputsParams(regex=r"[A-Z][a-z]{2,8} [0-9]{3}-[0-9]{4}"),
         lambda t: re.fullmatch(r"[A-Z][a-z]{2,8} [0-9]{3}-[0-9]{4}", t) is not None),
        (StructuredOutputsParams(choice=["red", "green", 'sky "blue"']),
         lambda t: t in ("red", "green", 'sky "blue"')),
        (StructuredOutputsParams(grammar='root ::= "(" num ("+" num)* ")" \nnum ::= [1-9] [0-9]?'),
         lambda t: re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", t) is not None),
    ]
    outs = smollm2.generate(["Answer: "] * len(cases), [greedy(so, 120) for so, _ in cases], use_tqdm=False)
    for (so, ok), out in zip(cases, outs):
        c = out.outputs[0]
        assert c.finish_reason == "stop" and ok(c.text), (so.kind, c.text)


def test_grammar_that_cannot_finish_ends_with_length(smollm2):
    out = smollm2.generate(["Count:"], greedy(StructuredOutputsParams(regex="[0-9]{40}"), max_tokens=5),
                           use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and out.text.isdigit() and len(out.token_ids) == 5


@pytest.mark.parametrize("so, needle", [
    (StructuredOutputsParams(json='{"type": "objec"}'), "json"),
    (StructuredOutputsParams(json="{not json"), "not valid JSON"),
    (StructuredOutputsParams(regex="[a-"), "regex"),
    (StructuredOutputsParams(grammar='root ::= "a" | '), "grammar"),
])
def test_bad_grammar_is_a_precise_error_and_others_are_unaffected(smollm2, so, needle):
    plain = SamplingParams(temperature=0, max_tokens=6)
    want = smollm2.generate(["The sky is"], plain, use_tqdm=False)[0].outputs[0].token_ids
    bad, good = smollm2.generate(["x", "The sky is"], [greedy(so), plain], use_tqdm=False)
    assert bad.error is not None and needle in bad.error and bad.outputs[0].finish_reason == "error"
    assert good.error is None and good.outputs[0].token_ids == want
    with pytest.raises(ValueError, match=needle):
        smollm2.engine.add_request("direct", "x", greedy(so))
    assert not smollm2.engine.has_unfinished_requests()


def test_oversized_constraints_are_rejected_on_creation():
    with pytest.raises(ValueError, match="at most"):
        StructuredOutputsParams(regex="a" * (65 * 1024))
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="choice"):
        StructuredOutputsParams(choice=[])


def test_compile_failure_and_slow_compile_fail_only_their_request(smollm2, monkeypatch):
    import fastinfer.engine.llm_engine as le

    monkeypatch.setattr(le, "GRAMMAR_COMPILE_TIMEOUT_S", 0.0)
    eng = smollm2.engine
    orig = eng.worker.compile_grammar

    def slow(p):
        import time

        time.sleep(0.3)
        return orig(p)

    monkeypatch.setattr(eng.worker, "compile_grammar", slow)
    so = StructuredOutputsParams(regex="[a-z]{5} slow")
    bad, good = smollm2.generate(["x", "The sky is"], [greedy(so), SamplingParams(temperature=0, max_tokens=4)],
                                 use_tqdm=False)
    assert bad.error is not None and "took longer" in bad.error
    assert good.error is None and len(good.outputs[0].token_ids) == 4


# -- invariants on a tiny random model (fast): the grammar never changes what exactness guarantees ---------
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                                           "b": {"type": "array", "items": {"type": "string", "maxLength": 5},
                                                 "maxItems": 3}},
          "required": ["a", "b"], "additionalProperties": False}
TINY_PROMPTS = ["The history of the printing press begins in", "def add(a, b):", "Paris is",
                "In 1492, a sailor set out across the ocean and after many weeks at sea"]


def _tokens(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


@pytest.fixture(scope="module")
def tiny_reference(tiny_llm):
    llm = tiny_llm("llama")
    sps = [greedy(StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True), 40),
           greedy(StructuredOutputsParams(regex="[a-f0-9]{30}"), 24)]
    alone = [_tokens(llm.generate([p], sps[i % 2], use_tqdm=False))[0] for i, p in enumerate(TINY_PROMPTS)]
    return sps, alone


def test_grammar_batched_chunked_preempted_cached_equal_alone(tiny_llm, tiny_reference):
    sps, alone = tiny_reference
    per = [sps[i % 2] for i in range(len(TINY_PROMPTS))]
    for kw in ({}, {"max_num_batched_tokens": 5}, {"num_kv_blocks": 20, "block_size": 4, "max_model_len": 64},
               {"enable_prefix_caching": False}):
        llm = tiny_llm("llama", **kw)
        got = _tokens(llm.generate(TINY_PROMPTS, per, use_tqdm=False))
        assert got == alone, kw
        if "num_kv_blocks" in kw:
            assert llm.engine.scheduler.num_preemptions > 0
    cached = tiny_llm("llama")
    cached.generate(TINY_PROMPTS, per, use_tqdm=False)
    assert _tokens(cached.generate(TINY_PROMPTS, per, use_tqdm=False)) == alone  # second run hits the cache
    assert cached.engine.kv.prefix_hits > 0
    for toks, sp in zip(alone, per):  # the tiny random model still obeys the grammar
        text = cached.get_tokenizer().decode(toks[0], skip_special_tokens=True)
        regex = sp.structured_outputs.regex
        assert re.fullmatch("[a-f0-9]{1,30}", text) if regex else text.startswith('{"a":'), text


def test_grammar_with_speculation_and_n2_equals_grammar_alone(tiny_llm, tiny_reference):
    sps, alone = tiny_reference
    spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1,
            "disable_by_batch_size": 64}
    llm = tiny_llm("llama", speculative_config=spec)
    two = [SamplingParams(n=2, temperature=0, max_tokens=sp.max_tokens, structured_outputs=sp.structured_outputs)
           for sp in sps]
    got = _tokens(llm.generate(TINY_PROMPTS, [two[i % 2] for i in range(len(TINY_PROMPTS))], use_tqdm=False))
    assert got == [[a[0], a[0]] for a in alone]
    st = llm.engine.spec_summary()
    assert st["draft_tokens"] > 0 and st["accepted_tokens"] > 0
    assert st["accepted_tokens"] < st["draft_tokens"]  # drafts were rejected too: the rollback path ran
