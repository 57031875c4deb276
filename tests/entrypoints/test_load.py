"""Bounded load test: 64 concurrent streaming clients, 256 requests, zero lost or corrupted responses
(every streamed text equals the offline greedy result for its prompt)."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from fastinfer import SamplingParams
from tests.entrypoints.conftest import ServerThread, free_port

N_REQ, CONC = 256, 64


@pytest.mark.slow
def test_64_concurrent_streams_no_loss(tiny_llm):
    from fastinfer.entrypoints.openai_server import ServerConfig, build_app

    llm = tiny_llm("llama", max_num_seqs=64)
    prompts = [f"Request number {i}: the story of item {i * 7 % 13}" for i in range(N_REQ)]
    lens = [8 + i % 17 for i in range(N_REQ)]
    expected = [o.outputs[0].text for o in llm.generate(
        prompts, [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in lens], use_tqdm=False)]
    cfg = ServerConfig(served_model_name="tiny", max_pending=N_REQ)
    with ServerThread(build_app(llm.engine, cfg), free_port()) as srv:
        sem = asyncio.Semaphore(CONC)

        async def one(c: httpx.AsyncClient, i: int) -> tuple[str, int, str | None]:
            async with sem:
                body = {"model": "tiny", "prompt": prompts[i], "max_tokens": lens[i], "temperature": 0,
                        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
                text, usage, finish = "", 0, None
                async with c.stream("POST", srv.url + "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        ev = json.loads(line[6:])
                        if ev["choices"]:
                            text += ev["choices"][0]["text"]
                            finish = ev["choices"][0]["finish_reason"] or finish
                        else:
                            usage = ev["usage"]["completion_tokens"]
                return text, usage, finish

        async def go():
            async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=CONC)) as c:
                return await asyncio.gather(*[one(c, i) for i in range(N_REQ)])

        results = asyncio.run(go())
    assert [r[0] for r in results] == expected
    assert [r[1] for r in results] == lens
    assert all(r[2] == "length" for r in results)
    assert llm.engine.kv.pool.num_free_blocks == llm.engine.num_kv_blocks


def test_offline_defaults_come_from_generation_config(tiny_model_dir, tmp_path):
    """vLLM's generation_config="auto": generate() without params uses the model's generation_config.json."""
    import json
    import shutil

    from fastinfer import LLM

    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir("llama"), d)
    (d / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "max_new_tokens": 5}))
    llm = LLM(str(d), dtype="float32", max_model_len=256, load_progress=False)
    sp = llm.get_default_sampling_params()
    assert sp.temperature == 0.0 and sp.max_tokens == 5
    out = llm.generate(["Paris is"], use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) <= 5
    plain = LLM(str(d), dtype="float32", max_model_len=256, load_progress=False, generation_config="vllm")
    assert plain.get_default_sampling_params().max_tokens == 16
    (d / "generation_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="not a readable JSON file"):
        LLM(str(d), dtype="float32", max_model_len=256, load_progress=False).get_default_sampling_params()
