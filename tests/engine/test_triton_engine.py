"""The engine on the Triton backend (the interpreter on CPU) gives the same greedy tokens as on the torch
backend: mixed prefill/decode batches, chunked prefill over earlier context, a sliding window, and the
copy-on-write block copies of n > 1."""
from __future__ import annotations

import os

import pytest
import torch

from fastinfer import SamplingParams
from fastinfer.ops.registry import OPS_WITHOUT_TRITON

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the Triton backend needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

PROMPTS = [
    "The history of the printing press begins in",
    "Paris is",
    "In 1492, a sailor set out across the ocean and after many weeks at sea he finally saw",
]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def _tokens(llm, prompts, params=GREEDY):
    return [[o.token_ids for o in r.outputs] for r in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("arch,kw", [
    ("llama", {"block_size": 8, "max_num_batched_tokens": 16}),  # chunked prefill mixed with decodes
    ("mistral", {"block_size": 16}),  # sliding window 24, shorter than the longest prompt
])
def test_triton_backend_matches_torch(tiny_llm, arch, kw):
    tri = tiny_llm(arch, attention_backend="triton", enable_prefix_caching=False, **kw)
    assert tri.engine.worker.ops.chosen["paged_attention"] == "triton"
    assert all(b == "triton" for op, b in tri.engine.worker.ops.chosen.items()
               if op not in OPS_WITHOUT_TRITON), \
        tri.engine.worker.ops.describe()  # no Triton argmax / W4A8 kernels: cpp here, torch on a GPU
    ref = tiny_llm(arch, attention_backend="torch", enable_prefix_caching=False, **kw)
    assert ref.engine.worker.ops.chosen["paged_attention"] == "torch"
    assert _tokens(tri, PROMPTS) == _tokens(ref, PROMPTS)


def test_triton_forks_copy_blocks(tiny_llm):
    """n = 2 forks after the prefill: the last prompt block is copied with the Triton copy_blocks."""
    params = SamplingParams(n=2, temperature=0, max_tokens=6, ignore_eos=True)
    prompt = {"prompt_token_ids": list(range(2000, 2013))}
    tri = tiny_llm("llama", attention_backend="triton", block_size=4, enable_prefix_caching=False)
    ref = tiny_llm("llama", attention_backend="torch", block_size=4, enable_prefix_caching=False)
    ops = tri.engine.worker.ops
    assert ops.chosen["copy_blocks"] == "triton"
    calls = []
    triton_copy = ops.copy_blocks
    ops.copy_blocks = lambda *a: calls.append(a[2].tolist()) or triton_copy(*a)  # count the copies
    try:
        got = _tokens(tri, [prompt], params)
    finally:
        ops.copy_blocks = triton_copy
    assert calls, "the fork did not copy a block"
    assert got == _tokens(ref, [prompt], params)
    assert got[0][0] == got[0][1]
