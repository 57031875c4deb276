"""/v1/completions ``echo`` + ``logprobs`` (OpenAI's legacy format: the prompt's tokens first, the first one
null) and ``prompt_logprobs`` (vLLM's) through a real server on SmolLM2 equal the offline engine's
``SamplingParams(prompt_logprobs=k)`` (the engine's own tests compare that with HF transformers), with
``max_tokens=0`` and > 0, streamed and not, before and after the prompt is in the prefix cache."""
from __future__ import annotations

import httpx
import pytest

from fastinfer import SamplingParams
from tests.entrypoints.conftest import API_KEY, openai_client

H = {"Authorization": f"Bearer {API_KEY}"}
M = "smollm2"
PROMPT = "The quick brown fox jumps over the lazy dog because"
K = 2
TOL = 1e-4


@pytest.fixture(scope="module")
def reference(smollm2_llm):
    """Offline results, computed before any server runs the engine."""
    tok = smollm2_llm.get_tokenizer()
    only, three = smollm2_llm.generate([PROMPT, PROMPT], [
        SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=K),
        SamplingParams(max_tokens=3, temperature=0, logprobs=K, prompt_logprobs=K)], use_tqdm=False)
    ids = tok.encode(PROMPT)
    assert only.prompt_token_ids == ids and len(only.prompt_logprobs) == len(ids)
    return {"ids": ids, "prompt": only.prompt_logprobs, "gen": three.outputs[0],
            "pieces": [tok.decode([t], skip_special_tokens=False) for t in ids]}


@pytest.fixture(scope="module")
def url(reference, smollm2_server):
    return smollm2_server()


def _check_prompt_part(lp, reference):
    n = len(reference["ids"])
    assert lp.tokens[:n] == reference["pieces"]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, n):
        entry = reference["prompt"][i]
        chosen = entry[reference["ids"][i]]
        assert lp.token_logprobs[i] == pytest.approx(chosen.logprob, abs=TOL)
        want = {v.decoded_token: v.logprob for t, v in entry.items() if t == reference["ids"][i] or v.rank <= K}
        assert lp.top_logprobs[i].keys() == want.keys()
        assert list(lp.top_logprobs[i].values()) == pytest.approx(list(want.values()), abs=TOL)


def _check_offsets(lp, text):
    assert lp.text_offset[0] == 0
    for i in range(1, len(lp.tokens)):
        assert lp.text_offset[i] == lp.text_offset[i - 1] + len(lp.tokens[i - 1])
    assert "".join(lp.tokens) == text  # SmolLM2's byte-level BPE pieces add up to the text


def test_echo_max_tokens_0_scores_the_prompt(url, reference):
    c = openai_client(url)
    r = c.completions.create(model=M, prompt=PROMPT, max_tokens=0, echo=True, logprobs=K)
    ch = r.choices[0]
    assert ch.text == PROMPT and ch.finish_reason == "length"
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(reference["ids"])
    assert len(ch.logprobs.tokens) == len(reference["ids"])
    _check_prompt_part(ch.logprobs, reference)
    _check_offsets(ch.logprobs, ch.text)
    ids = c.completions.create(model=M, prompt=reference["ids"], max_tokens=0, echo=True).choices[0]
    assert ids.text == PROMPT and ids.logprobs is None


def test_echo_with_completion_and_prefix_cache(url, reference):
    c = openai_client(url)
    gen = reference["gen"]
    c.completions.create(model=M, prompt=PROMPT, max_tokens=2, temperature=0)  # the prompt now sits in the cache
    for _ in range(2):
        ch = c.completions.create(model=M, prompt=PROMPT, max_tokens=3, echo=True, logprobs=K,
                                  temperature=0).choices[0]
        n = len(reference["ids"])
        assert ch.text == PROMPT + gen.text
        _check_prompt_part(ch.logprobs, reference)
        assert ch.logprobs.tokens[n:] == [gen.logprobs[i][t].decoded_token for i, t in enumerate(gen.token_ids)]
        assert ch.logprobs.token_logprobs[n:] == pytest.approx(
            [gen.logprobs[i][t].logprob for i, t in enumerate(gen.token_ids)], abs=TOL)
        _check_offsets(ch.logprobs, ch.text)


def test_echo_streamed_equals_whole(url, reference):
    c = openai_client(url)
    kw = dict(model=M, prompt=PROMPT, echo=True, logprobs=K, temperature=0)
    for max_tokens in (0, 4):
        whole = c.completions.create(**kw, max_tokens=max_tokens).choices[0]
        chunks = [ch.choices[0] for ch in c.completions.create(**kw, max_tokens=max_tokens, stream=True)
                  if ch.choices]
        assert chunks[0].text.startswith(PROMPT)
        assert "".join(ch.text for ch in chunks) == whole.text
        assert sum((ch.logprobs.tokens for ch in chunks), []) == whole.logprobs.tokens
        assert sum((ch.logprobs.text_offset for ch in chunks), []) == whole.logprobs.text_offset
        streamed = sum((ch.logprobs.token_logprobs for ch in chunks), [])
        assert streamed[0] is None and streamed[1:] == pytest.approx(whole.logprobs.token_logprobs[1:], abs=TOL)
        assert chunks[-1].finish_reason == "length"


def test_prompt_logprobs_field(url, reference):
    r = httpx.post(url + "/v1/completions", headers=H, timeout=60, json={
        "model": M, "prompt": PROMPT, "max_tokens": 1, "prompt_logprobs": K}).json()
    plp = r["choices"][0]["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(reference["ids"])
    for i in range(1, len(plp)):
        want = {str(t): v for t, v in reference["prompt"][i].items() if t == reference["ids"][i] or v.rank <= K}
        assert plp[i].keys() == want.keys()
        for t, v in want.items():
            assert plp[i][t]["rank"] == v.rank and plp[i][t]["decoded_token"] == v.decoded_token
            assert plp[i][t]["logprob"] == pytest.approx(v.logprob, abs=TOL)
    chat = httpx.post(url + "/v1/chat/completions", headers=H, timeout=60, json={
        "model": M, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 1, "prompt_logprobs": 0,
        "return_token_ids": True}).json()
    plp, ids = chat["prompt_logprobs"], chat["prompt_token_ids"]
    assert plp[0] is None and len(plp) == len(ids)
    assert all(list(e) == [str(t)] for e, t in zip(plp[1:], ids[1:]))  # k=0: the prompt token only
