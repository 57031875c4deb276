"""The engine on an int8 (and fp8) KV cache, tiny model: prefix caching, preemption, n-gram speculation and
copy-on-write forks change nothing (the same invariants as the float cache); the capacity a byte budget buys;
configuration errors."""
from __future__ import annotations

import logging

import pytest

from fastinfer import SamplingParams
from fastinfer.config import EngineConfig

SYSTEM = "You are a careful assistant. Answer questions about the printing press and its spread. " * 2
QUESTIONS = ["Who built the first press?", "When did it reach Venice?", "What did a book cost?"]
PROMPTS = [SYSTEM + q for q in QUESTIONS] + ["1 2 3 1 2 3 1 2 3 1 2", "abc abc abc abc"]
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1,
        "disable_by_batch_size": 8}


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def reference(tiny_llm):
    """int8 KV, prefix caching off, each prompt alone (the cpp backend on this CPU)."""
    llm = tiny_llm("llama", kv_cache_dtype="int8", enable_prefix_caching=False)
    return [_tokens(llm.generate([p], GREEDY, use_tqdm=False))[0] for p in PROMPTS]


def test_prefix_cache_on_equals_off(tiny_llm, reference):
    on = tiny_llm("llama", kv_cache_dtype="int8", enable_prefix_caching=True)
    assert _tokens(on.generate(PROMPTS[:1], GREEDY, use_tqdm=False)) == reference[:1]
    outs = on.generate(PROMPTS, GREEDY, use_tqdm=False)  # warm: the system prompt comes from the cache
    assert _tokens(outs) == reference
    assert all(o.num_cached_tokens > 0 for o in outs[:3])


def test_preempted_equals_uninterrupted(tiny_llm, reference):
    tight = tiny_llm("llama", kv_cache_dtype="int8", num_kv_blocks=24, block_size=4, max_model_len=64,
                     enable_prefix_caching=False)
    outs = tight.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions > 0
    assert _tokens(outs) == reference


def test_ngram_speculation_equals_plain(tiny_llm, reference):
    spec = tiny_llm("llama", kv_cache_dtype="int8", speculative_config=SPEC, enable_prefix_caching=False)
    assert _tokens(spec.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference
    assert spec.engine.spec_summary()["accepted_tokens"] > 0


def test_draft_model_speculation_equals_plain(tiny_llm, reference):
    """A draft model (the target's int4 self-draft) writes its own KV into an int8 cache over the target's blocks."""
    spec = tiny_llm("llama", kv_cache_dtype="int8", enable_prefix_caching=False,
                    speculative_config={"method": "draft_model", "quantization": "int4-g32",
                                        "num_speculative_tokens": 3, "cost_aware": False, "disable_by_batch_size": 8})
    assert _tokens(spec.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference
    assert spec.engine.spec_summary()["draft_tokens"] > 0


def test_fixed_size_decode_step_equals_eager(tiny_llm, reference):
    """The padded decode step (static mode: the CUDA-graph path run eagerly) on int8 KV."""
    static = tiny_llm("llama", kv_cache_dtype="int8", compilation_config={"mode": "static"},
                      enable_prefix_caching=False)
    assert _tokens(static.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference
    assert static.engine.worker.decode_graph_runs() > 0


def test_generic_path_equals_native(tiny_llm, reference):
    """transformers' own modules with our PagedLayer (the generic path) on the int8 cache."""
    generic = tiny_llm("llama", kv_cache_dtype="int8", model_impl="transformers", enable_prefix_caching=False)
    assert _tokens(generic.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference


def test_forks_copy_on_write(tiny_llm):
    """Sample i of a forked n=2 request (the samples share the prompt's int8 blocks, the last one copied on
    write) equals sample i when every sample prefills on its own."""
    sp = SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)
    forked = tiny_llm("llama", kv_cache_dtype="int8").generate("A seeded fan-out test", sp, use_tqdm=False)[0]
    alone = tiny_llm("llama", kv_cache_dtype="int8", max_num_seqs=1).generate("A seeded fan-out test", sp,
                                                                               use_tqdm=False)[0]
    assert [o.token_ids for o in forked.outputs] == [o.token_ids for o in alone.outputs]
    assert len({tuple(o.token_ids) for o in forked.outputs}) == 2


def test_fp8_on_cpu_runs_and_says_so(tiny_llm, caplog):
    with caplog.at_level(logging.WARNING, logger="fastinfer"):
        llm = tiny_llm("llama", kv_cache_dtype="fp8")  # vLLM's alias
    assert llm.engine.config.kv_cache_dtype == "fp8_e4m3"
    out = _tokens(llm.generate(PROMPTS[3:], GREEDY, use_tqdm=False))
    assert all(len(t) == 20 for t in out)
    if llm.engine.worker.ops.chosen.get("paged_attention") == "cpp":
        assert "fp8_e4m3 on the CPU" in caplog.text


def test_capacity_at_fixed_memory(tiny_llm):
    """Same kv_cache_memory_bytes: int8 holds >= 1.9x the tokens of bf16 and >= 3.8x of fp32 (head_dim 16 here:
    2 * 16 / 18 = 1.78x of bf16 with the scales, so the SmolLM2 shape, head_dim 64, is checked below)."""
    budget = 4 << 20
    blocks = {(dt, kv): tiny_llm("llama", dtype=dt, kv_cache_dtype=kv, kv_cache_memory_bytes=budget).engine
              .num_kv_blocks for dt, kv in [("float32", "auto"), ("bfloat16", "auto"), ("float32", "int8")]}
    assert blocks[("float32", "int8")] / blocks[("bfloat16", "auto")] >= 2 * 16 / 18 * 0.99
    assert blocks[("float32", "int8")] / blocks[("float32", "auto")] >= 4 * 16 / 18 * 0.99


def test_capacity_smollm2_shape():
    """The worker's plan for SmolLM2-135M's KV shape (30 layers x 3 KV heads x 64) at one byte budget."""
    import torch

    from fastinfer.models.interface import LayerKVSpec
    from fastinfer.worker.kv_cache import plan_kv_cache

    spec = [LayerKVSpec(3, 64, None)] * 30

    def tokens(dtype, kv):
        cfg = EngineConfig(model="x", kv_cache_memory_bytes=256 << 20, kv_cache_dtype=kv, max_num_seqs=4)
        return plan_kv_cache(cfg, 2048, torch.device("cpu"), spec, dtype).num_blocks[0] * cfg.block_size

    int8 = tokens(torch.float32, "int8")
    assert int8 / tokens(torch.bfloat16, "auto") >= 1.9
    assert int8 / tokens(torch.float32, "auto") >= 3.8
    assert tokens(torch.float32, "fp8_e4m3") == int8


def test_bad_kv_cache_dtype():
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        EngineConfig(model="x", kv_cache_dtype="int4")
    assert EngineConfig(model="x", kv_cache_dtype="fp8").kv_cache_dtype == "fp8_e4m3"


def test_cli_flag():
    from fastinfer.entrypoints.cli import build_parser

    parser = build_parser()
    for cmd in (["generate", "m", "hi"], ["serve", "m"], ["verify", "m"], ["chat", "m"]):
        assert parser.parse_args([*cmd, "--kv-cache-dtype", "int8"]).kv_cache_dtype == "int8"
        assert parser.parse_args(cmd).kv_cache_dtype == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "m", "hi", "--kv-cache-dtype", "int4"])
