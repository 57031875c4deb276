"""Sliding-window KV groups through the engine, against HF transformers (fp32 greedy): a model mixing 16-token
window layers with full-attention layers (Qwen2 with ``layer_types``) and Mistral (every layer windowed, 24), with
prompts several windows long, chunked prefill across the window edges, prefix caching over a shared long prefix,
n-gram speculation and preemption. The window group's blocks in use stay bounded by the window, not the
context (read from the scheduler's per-group stats)."""
from __future__ import annotations

import os
import random
import shutil

import pytest
import torch

from fastinfer import LLM, SamplingParams
from fastinfer.core.kv_cache_utils import cdiv

BS, NEW, SEQS = 4, 20, 4
SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
RUNS = {  # engine settings on top of block_size=BS, max_num_seqs=SEQS, max_model_len=256
    "chunked+prefix": {"enable_prefix_caching": True, "max_num_batched_tokens": 30},
    "ngram": {"speculative_config": SPEC, "max_num_batched_tokens": 64},
    "preempt": {"max_num_batched_tokens": 32},  # num_kv_blocks per model below
}
PREEMPT_BLOCKS = {"mixed": 64, "mistral": 20}


def _prompts() -> list[list[int]]:
    """Four prompts of 90-130 tokens sharing a 60-token prefix; repeated phrases give n-gram drafts."""
    rng = random.Random(0)
    phrase = [rng.randrange(3, 40000) for _ in range(12)]
    prefix = (phrase * 5)[:60]
    return [prefix + [rng.randrange(3, 40000) for _ in range(30 + 10 * i)] + phrase[:8] for i in range(SEQS)]


def _mixed_dir(tmp_path_factory, tokenizer_dir: str) -> str:
    """A tiny random Qwen2 whose layers 0, 2, 3 use a 16-token window and layer 1 full attention."""
    import transformers

    torch.manual_seed(1)
    cfg = transformers.Qwen2Config(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                                   use_sliding_window=True, sliding_window=16, max_window_layers=0,
                                   layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                                "sliding_attention"])
    model = transformers.Qwen2ForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    d = tmp_path_factory.mktemp("tiny-mixed-window")
    model.save_pretrained(d, safe_serialization=True)
    for f in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, f), d)
    return str(d)


def _hf_greedy(path: str, prompts: list[list[int]], windowed: bool = True) -> list[list[int]]:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path)
    if not windowed:  # the same weights attending to everything: proves the windows change the output
        cfg.sliding_window = None
        cfg.use_sliding_window = False
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = ["full_attention"] * len(cfg.layer_types)
    hf = AutoModelForCausalLM.from_pretrained(path, config=cfg, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        return [hf.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False)[0, len(p):].tolist()
                for p in prompts]


@pytest.fixture(scope="module", params=["mixed", "mistral"])
def model(request, tmp_path_factory, smollm2_tokenizer_dir, tiny_model_dir):
    """(name, model directory, its windows, HF greedy outputs of the prompts)."""
    name = request.param
    path = _mixed_dir(tmp_path_factory, smollm2_tokenizer_dir) if name == "mixed" else tiny_model_dir("mistral")
    prompts = _prompts()
    ref = _hf_greedy(path, prompts)
    assert ref != _hf_greedy(path, prompts, windowed=False), "the prompts must be long enough for the windows"
    return name, path, ref


def _serve(llm: LLM, prompts: list[list[int]]) -> tuple[list[list[int]], list]:
    """Run the prompts through the engine step by step; the token ids per prompt and the scheduler's stats (with
    the running requests' context blocks) after every step."""
    eng = llm.engine
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    for i, p in enumerate(prompts):
        eng.add_request(f"p{i}", {"prompt_token_ids": p}, params)
    out: dict[str, list[int]] = {}
    trace = []
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                out[o.request_id] = list(o.outputs[0].token_ids)
        ctx = sum(cdiv(r.num_computed_tokens, BS) for r in eng.scheduler.running)
        trace.append((eng.scheduler.stats(), ctx))
    return [out[f"p{i}"] for i in range(len(prompts))], trace


@pytest.mark.parametrize("run", list(RUNS))
def test_windowed_groups_match_hf_and_stay_bounded(model, run):
    name, path, ref = model
    kw = dict(RUNS[run])
    if run == "preempt":
        kw["num_kv_blocks"] = PREEMPT_BLOCKS[name]
    llm = LLM(path, dtype="float32", block_size=BS, max_num_seqs=SEQS, max_model_len=256, load_progress=False, **kw)
    got, trace = _serve(llm, _prompts())
    assert got == ref
    stats = trace[-1][0]
    windows = [g.sliding_window for g in stats.kv_groups]
    assert windows == ([None, 16] if name == "mixed" else [24])
    budget = kw["max_num_batched_tokens"]
    for st, _ in trace:
        for g in st.kv_groups:
            if g.sliding_window is not None:  # about a window per running request, whatever the context
                w = g.sliding_window
                assert g.num_in_use <= st.num_running * (cdiv(w - 1, BS) + 2) + cdiv(budget, BS)
    peak_ctx = max(ctx for _, ctx in trace)
    win = next(g for g in stats.kv_groups if g.sliding_window is not None)
    assert win.peak_in_use < peak_ctx / 2  # the contexts held far more blocks than the window group ever did
    assert all(g.num_in_use == 0 for g in stats.kv_groups)
    if run == "preempt":
        assert stats.num_preemptions > 0
    if run == "chunked+prefix":
        assert stats.prefix_hits >= 3 * 56  # the later prompts hit the shared prefix (whole blocks)
    if run == "ngram":
        assert llm.engine.spec_stats["draft_tokens"] > 0


@pytest.mark.parametrize("backend", [None, "torch"], ids=["default", "torch"])
def test_null_block_full_of_nan_changes_nothing(model, backend):
    """Fill every window group's null block with NaN in every layer before serving: outputs stay HF's (no
    kernel reads a block before a window), with the CPU's default attention backend and the torch one."""
    name, path, ref = model
    llm = LLM(path, dtype="float32", block_size=BS, max_num_seqs=SEQS, max_model_len=256, load_progress=False,
              max_num_batched_tokens=24, attention_backend=backend)
    worker = llm.engine.worker
    layout = worker.kv_layout
    for (k, v), g in zip(worker.runner.kv_caches, layout.layer_groups):
        if layout.windows[g] is not None:
            k[layout.num_blocks[g]] = v[layout.num_blocks[g]] = float("nan")
    got, _ = _serve(llm, _prompts())
    assert got == ref


def test_forked_samples_copy_every_group(model):
    """n = 2 greedy samples per prompt: the second forks from the first's prefill (shared blocks per group and a
    copy of the last prompt block in every group, window group included); every sample equals HF's greedy."""
    name, path, ref = model
    llm = LLM(path, dtype="float32", block_size=BS, max_num_seqs=SEQS, max_model_len=256, load_progress=False,
              max_num_batched_tokens=256)
    sched, copies = llm.engine.scheduler, []
    schedule = sched.schedule

    def recording():
        out = schedule()
        copies.extend(out.blocks_to_copy)
        return out

    sched.schedule = recording  # type: ignore[method-assign]
    prompts = _prompts()[:2]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(n=2, temperature=0, max_tokens=NEW, ignore_eos=True), use_tqdm=False)
    assert [[list(c.token_ids) for c in o.outputs] for o in outs] == [[r, r] for r in ref[:2]]
    groups = len(sched.stats().kv_groups)
    assert sorted({g for g, _, _ in copies}) == list(range(groups)) and len(copies) == 2 * groups


def test_draft_model_keeps_one_group_and_stays_exact(tiny_model_dir):
    """With a draft model (here the int4 self-draft) the target's windowed layers keep every block in one group
    (the draft's catch-up reads positions the target has passed); greedy output is still HF's."""
    path = tiny_model_dir("mistral")
    prompts = _prompts()[:2]
    llm = LLM(path, dtype="float32", block_size=BS, max_num_seqs=SEQS, max_model_len=256, load_progress=False,
              max_num_batched_tokens=32, speculative_config={"method": "draft_model", "num_speculative_tokens": 2,
                                                          "cost_aware": False})
    got, trace = _serve(llm, prompts)
    assert got == _hf_greedy(path, prompts)
    assert [g.sliding_window for g in trace[-1][0].kv_groups] == [None]
    assert llm.engine.spec_stats["draft_tokens"] > 0
