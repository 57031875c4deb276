"""OpenAI-compatible server: official client round trips, greedy == offline API, bad input -> OpenAI
errors, auth, limits, disconnects free KV blocks, floods get 429, the server keeps serving."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from fastinfer import SamplingParams
from tests.entrypoints.conftest import API_KEY

H = {"Authorization": f"Bearer {API_KEY}"}


def _idle(llm, timeout=30.0):
    """Wait until the engine holds no requests and no KV blocks."""
    import time

    eng = llm.engine
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not eng.has_unfinished_requests() and eng.kv.pool.num_free_blocks == eng.num_kv_blocks:
            return True
        time.sleep(0.05)
    return False


def test_completion_greedy_equals_offline(served, client):
    llm, _ = served
    r = client.completions.create(model="tiny", prompt="The history of", max_tokens=12, temperature=0)
    want = llm.generate("The history of", SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    assert r.choices[0].text == want.outputs[0].text
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.usage.completion_tokens == len(want.outputs[0].token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_greedy_equals_offline_and_streaming_matches(served, client):
    llm, _ = served
    msgs = [{"role": "user", "content": "Say something"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0)
    want = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0]
    assert r.choices[0].message.content == want.outputs[0].text and r.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.outputs[0].text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10 and not chunks[-1].choices
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens


def test_n_stop_logprobs_seed(served, client):
    r = client.completions.create(model="tiny", prompt="Once", max_tokens=8, n=3, temperature=1.0, seed=3)
    assert sorted(c.index for c in r.choices) == [0, 1, 2] and r.usage.completion_tokens == 24
    r2 = client.completions.create(model="tiny", prompt="Once", max_tokens=8, n=3, temperature=1.0, seed=3)
    assert [c.text for c in r.choices] == [c.text for c in r2.choices]
    base = client.completions.create(model="tiny", prompt="Once", max_tokens=12, temperature=0).choices[0].text
    stop = base[3:6]
    s = client.completions.create(model="tiny", prompt="Once", max_tokens=12, temperature=0, stop=[stop])
    assert s.choices[0].text == base[:base.find(stop)] and s.choices[0].finish_reason == "stop"
    lp = client.completions.create(model="tiny", prompt="Once", max_tokens=4, temperature=0, logprobs=2)
    assert len(lp.choices[0].logprobs.token_logprobs) == 4 and len(lp.choices[0].logprobs.top_logprobs[0]) >= 2
    c = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == 3 and len(content[0].top_logprobs) == 2
    assert content[0].logprob == content[0].top_logprobs[0].logprob


def test_models_tokenize_detokenize_health_metrics(served):
    _, url = served
    m = httpx.get(url + "/v1/models", headers=H).json()
    assert m["data"][0]["id"] == "tiny"
    t = httpx.post(url + "/tokenize", json={"prompt": "hello world"}, headers=H).json()
    assert t["count"] == len(t["tokens"]) > 0
    d = httpx.post(url + "/detokenize", json={"tokens": t["tokens"]}, headers=H).json()
    assert d["prompt"] == "hello world"
    assert httpx.get(url + "/health").json() == {"status": "ok"}  # open without a key
    body = httpx.get(url + "/metrics", headers=H).text
    for name in ("fastinfer_time_to_first_token_seconds", "fastinfer_num_requests_waiting",
                 "fastinfer_kv_cache_usage_perc", "fastinfer_num_preemptions_total",
                 "fastinfer_prefix_cache_hits_total", "fastinfer_generation_tokens_total"):
        assert name in body
    assert 'fastinfer_kv_cache_group_blocks_in_use{model_name="tiny",sliding_window="full"}' in body
    types = dict(ln.split()[2:4] for ln in body.splitlines()
                 if ln.startswith("# TYPE vllm:") and not ln.split()[2].endswith("_created"))
    assert types == {**{f"vllm:{n}": "gauge" for n in ("num_requests_running", "num_requests_waiting",
                                                        "kv_cache_usage_perc")},
                     **{f"vllm:{n}_total": "counter" for n in ("prefix_cache_queries", "prefix_cache_hits",
                                                          "num_preemptions", "request_success", "prompt_tokens",
                                                          "generation_tokens")},
                     **{f"vllm:{n}": "histogram" for n in ("request_prompt_tokens", "request_generation_tokens",
                                                            "time_to_first_token_seconds",
                                                            "inter_token_latency_seconds",
                                                            "time_per_output_token_seconds",
                                                            "e2e_request_latency_seconds")}}
    samples = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in body.splitlines()
               if ln and not ln.startswith("#")}
    assert samples['vllm:request_success_total{finished_reason="length",model_name="tiny"}'] >= 1
    for name in ("generation_tokens_total", "prompt_tokens_total", "prefix_cache_queries_total"):
        assert samples[f'vllm:{name}{{model_name="tiny"}}'] == samples[f'fastinfer_{name}{{model_name="tiny"}}'] > 0
    assert samples['vllm:e2e_request_latency_seconds_count{model_name="tiny"}'] == \
        samples['vllm:time_to_first_token_seconds_count{model_name="tiny"}'] >= 1


BAD = [
    ("invalid json", "/v1/completions", b"{not json", 400),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404),
    ("negative temperature", "/v1/completions", {"model": "tiny", "prompt": "x", "temperature": -1}, 400),
    ("nan temperature", "/v1/completions", b'{"model": "tiny", "prompt": "x", "temperature": NaN}', 400),
    ("top_p > 1", "/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 1.5}, 400),
    ("huge n", "/v1/completions", {"model": "tiny", "prompt": "x", "n": 100000}, 400),
    ("max_tokens beyond context", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 10**6}, 400),
    ("prompt too long", "/v1/completions", {"model": "tiny", "prompt": [5] * 600}, 400),
    ("empty prompt", "/v1/completions", {"model": "tiny", "prompt": ""}, 400),
    ("empty messages", "/v1/chat/completions", {"model": "tiny", "messages": []}, 400),
    ("wrong type", "/v1/chat/completions", {"model": "tiny", "messages": "hello"}, 400),
    ("wrong type max_tokens", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": "many"}, 400),
    ("bad role", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("token out of range", "/v1/completions", {"model": "tiny", "prompt": [10**9]}, 400),
    ("oversized body", "/v1/completions", {"model": "tiny", "prompt": "x" * 100_000}, 413),
]


@pytest.mark.parametrize("name,path,body,status", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_openai_error_and_server_keeps_serving(served, client, name, path, body, status):
    _, url = served
    kw = {"content": body, "headers": {**H, "content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body, "headers": H}
    r = httpx.post(url + path, **kw, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    ok = client.completions.create(model="tiny", prompt="still alive", max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason == "length"


def test_auth(served):
    _, url = served
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                    {"Authorization": f"Bearer {API_KEY}x"}, {"Host": "localhost", "X-Forwarded-For": "127.0.0.1"}):
        for path in ("/v1/models", "/tokenize", "/metrics"):
            r = httpx.get(url + path, headers=headers) if path != "/tokenize" else \
                httpx.post(url + path, json={"prompt": "x"}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    bad = openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_disconnect_mid_stream_frees_blocks(served):
    llm, url = served

    async def go():
        async with httpx.AsyncClient(timeout=60) as c:
            body = {"model": "tiny", "prompt": "abandon me", "max_tokens": 400, "stream": True, "ignore_eos": True}
            async with c.stream("POST", url + "/v1/completions", json=body, headers=H) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        break  # got a first chunk: now leave

    asyncio.run(go())
    assert _idle(llm)
    assert llm.engine.kv.usage() == 0.0


def test_flood_beyond_queue_gets_429_and_admitted_complete(served):
    llm, url = served
    # max_num_seqs 8 + max_pending 8 = 16 in flight: 40 concurrent long requests must see some 429s
    async def one(c, i):
        r = await c.post(url + "/v1/completions", headers=H, json={
            "model": "tiny", "prompt": f"flood {i}", "max_tokens": 60, "ignore_eos": True, "temperature": 0})
        return r.status_code, r.json()

    async def go():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as c:
            return await asyncio.gather(*[one(c, i) for i in range(40)])

    results = asyncio.run(go())
    codes = [s for s, _ in results]
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
    for status, body in results:
        if status == 200:
            assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 60
        else:
            assert body["error"]["type"] == "rate_limit_error"
    assert _idle(llm)


def test_raw_sse_format(served):
    _, url = served
    with httpx.stream("POST", url + "/v1/completions", headers=H, json={
            "model": "tiny", "prompt": "sse", "max_tokens": 3, "stream": True}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"
    for ln in lines[:-1]:
        assert json.loads(ln.removeprefix("data: "))["object"] == "text_completion"
