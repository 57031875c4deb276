"""The fixed-size decode step (CUDA graphs on a GPU; the same padded path run eagerly, ``static``, on any device):
greedy tokens identical to eager decoding with batches between the ladder's rungs, requests joining and leaving
mid-run, chunked prefill, preemption, the prefix cache and speculation; capture sizes, bad configs."""
from __future__ import annotations

import logging

import pytest
import torch

from fastinfer import SamplingParams
from fastinfer.config import EngineConfig
from fastinfer.worker.decode_graphs import capture_sizes

PROMPTS = ["The history of the printing press begins in", "def add(a, b):", "Paris is",
           "In 1492, a sailor set out across the ocean and after many weeks at sea", "1, 2, 3, 4,", "A",
           "The three primary colors are"]
# different lengths: the batch shrinks through 7, 6, 5, 3, ... as requests finish (rungs 1, 2, 4, 8)
SPS = [SamplingParams(temperature=0, max_tokens=6 + 5 * i, ignore_eos=True) for i in range(len(PROMPTS))]


def _tokens(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


@pytest.fixture(scope="module")
def eager(tiny_llm):
    llm = tiny_llm("llama", enforce_eager=True)
    assert llm.engine.worker.decode_graph_runs() == 0
    return _tokens(llm.generate(PROMPTS, SPS, use_tqdm=False))


STATIC = {"mode": "static", "cudagraph_capture_sizes": [1, 2, 4, 8]}
# the target's int4 self-draft, drafting at every batch size (lossless: greedy tokens equal plain decoding)
DRAFT_SPEC = {"method": "draft_model", "quantization": "int4-g32", "num_speculative_tokens": 3, "cost_aware": False,
              "disable_by_batch_size": 64}


@pytest.mark.parametrize("kw", [
    {},
    {"max_num_batched_tokens": 5},  # chunked prefill: mixed steps run eagerly, decode steps padded
    {"num_kv_blocks": 20, "block_size": 4, "max_model_len": 64},  # preemption
    {"speculative_config": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
                            "disable_by_batch_size": 64}},
    {"speculative_config": DRAFT_SPEC},  # the draft's single-token steps run padded too
], ids=["plain", "chunked", "preempted", "ngram-spec", "draft-spec"])
def test_static_decode_equals_eager(tiny_llm, eager, kw):
    llm = tiny_llm("llama", max_num_seqs=8, compilation_config=STATIC, **kw)
    got = _tokens(llm.generate(PROMPTS, SPS, use_tqdm=False))
    assert got == eager
    assert llm.engine.worker.decode_graph_runs() > 0
    if kw.get("speculative_config") is DRAFT_SPEC:
        assert llm.engine.worker.decode_graph_runs(draft=True) > 0
    if "num_kv_blocks" in kw:
        assert llm.engine.scheduler.num_preemptions > 0
    again = _tokens(llm.generate(PROMPTS, SPS, use_tqdm=False))  # prefix-cache hits, same tokens
    assert again == eager


def test_static_decode_with_n_and_seeded_sampling(tiny_llm):
    sps = [SamplingParams(n=3, temperature=0.9, seed=11, max_tokens=12, ignore_eos=True),
           SamplingParams(temperature=0.7, seed=5, top_p=0.9, max_tokens=9, ignore_eos=True)]
    want = _tokens(tiny_llm("llama", enforce_eager=True).generate(PROMPTS[:2], sps, use_tqdm=False))
    llm = tiny_llm("llama", max_num_seqs=8, compilation_config=STATIC)
    assert _tokens(llm.generate(PROMPTS[:2], sps, use_tqdm=False)) == want


def test_capture_sizes_ladder():
    assert capture_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert capture_sizes(5) == [1, 2, 4, 5]
    assert capture_sizes(16, [8, 2, 32]) == [2, 8]
    assert capture_sizes(4, [16]) == [4]


@pytest.mark.parametrize("cc, needle", [
    ({"mode": "fast"}, "mode must be one of"),
    ({"level": 3}, "unknown compilation_config keys"),
    ({"cudagraph_capture_sizes": [0, 2]}, "positive integers"),
    ({"cudagraph_capture_sizes": []}, "positive integers"),
    ({"inductor_compile_config": ["cpp_wrapper"]}, "inductor_compile_config must be a dict"),
])
def test_bad_compilation_config(cc, needle):
    with pytest.raises(ValueError, match=needle):
        EngineConfig(model="x", compilation_config=cc)


def test_modes_that_cannot_run_are_logged_not_hidden(tiny_llm, caplog):
    with caplog.at_level(logging.INFO, logger="fastinfer"):
        llm = tiny_llm("llama", compilation_config={"mode": "cuda_graph"}, device="cpu")
    assert "running eager: CUDA graphs need a CUDA device" in caplog.text
    assert llm.engine.worker.decode_graph_runs() == 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastinfer"):
        tiny_llm("llama", enforce_eager=True, compilation_config={"mode": "static"})
    assert "decode step: eager (enforce_eager)" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kw", [{}, {"num_kv_blocks": 20, "block_size": 4, "max_model_len": 64},
                                {"speculative_config": {"method": "ngram", "num_speculative_tokens": 3,
                                                        "disable_by_batch_size": 64}},
                                {"speculative_config": DRAFT_SPEC}])
def test_cuda_graphs_equal_eager(tiny_llm, kw):
    want = _tokens(tiny_llm("llama", device="cuda", enforce_eager=True, **kw).generate(PROMPTS, SPS, use_tqdm=False))
    llm = tiny_llm("llama", device="cuda", max_num_seqs=8,
                   compilation_config={"cudagraph_capture_sizes": [1, 2, 4, 8]}, **kw)
    assert _tokens(llm.generate(PROMPTS, SPS, use_tqdm=False)) == want
    assert llm.engine.worker.decode_graph_runs() > 0


def test_compiled_decode_equals_eager(tiny_llm, eager):
    """``torch.compile`` of the padded step (one rung of 8, so one compile): the eager tokens, while the batch
    shrinks from 7 to 1 inside the rung."""
    llm = tiny_llm("llama", max_num_seqs=8, compilation_config={"mode": "compile", "cudagraph_capture_sizes": [8]})
    assert _tokens(llm.generate(PROMPTS, SPS, use_tqdm=False)) == eager
    assert llm.engine.worker.decode_graph_runs() > 0


def test_compiled_draft_steps_equal_eager(tiny_llm, eager):
    """With a draft model the draft's single-token steps are compiled too (its own rung of 8): still the eager
    tokens, and both step kinds ran compiled."""
    llm = tiny_llm("llama", max_num_seqs=8, compilation_config={"mode": "compile", "cudagraph_capture_sizes": [8]},
                   speculative_config=DRAFT_SPEC)
    assert _tokens(llm.generate(PROMPTS, SPS, use_tqdm=False)) == eager
    assert llm.engine.worker.decode_graph_runs() > 0 and llm.engine.worker.decode_graph_runs(draft=True) > 0


class _TinyStep(torch.nn.Module):
    """A stand-in decode forward (compiles in well under a second per shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(2.0), requires_grad=False)

    def forward(self, input_ids, positions, meta):
        return (input_ids + positions).float()[:, None] * self.scale + meta.seq_lens.float()[:, None]


def test_compile_mode_compiles_every_rung_of_a_long_ladder():
    """Ten rungs are ten compiled entries of one forward, past dynamo's default recompile limit (8), where a new
    shape used to fall back to eager silently (batch 1, compiled last, ran eagerly): the capture compiles ten
    graphs (dynamo's own count) and every rung equals the eager result."""
    from torch._dynamo.utils import counters

    from fastinfer.ops import AttentionMetadata
    from fastinfer.worker.decode_graphs import DecodeGraphs

    rungs = list(range(1, 11))
    graphs = DecodeGraphs(_TinyStep(), torch.device("cpu"), "compile", rungs, max_model_len=32, block_size=4)
    before = counters["stats"]["unique_graphs"]
    graphs.capture()
    assert counters["stats"]["unique_graphs"] - before == len(rungs)
    for b in rungs:
        meta = AttentionMetadata.build([1] * b, [5 + i % 3 for i in range(b)], [[i, 20 + i] for i in range(b)], 4)
        ids, pos = torch.arange(b, dtype=torch.int64) + 7, torch.tensor([4 + i % 3 for i in range(b)])
        assert graphs.supports(meta)
        with torch.inference_mode():  # as the worker runs its steps (the capture does too)
            got = graphs.run(ids, pos, meta)
        torch.testing.assert_close(got, (ids + pos).float()[:, None] * 2 + meta.seq_lens.float()[:, None])
    assert counters["stats"]["unique_graphs"] - before == len(rungs)  # no recompiles while running
