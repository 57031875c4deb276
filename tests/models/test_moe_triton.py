"""A MoE model served on the Triton backend (every op, ``fused_moe`` included, through kernels/; the interpreter
on CPU): greedy tokens of a mixed batch equal HF transformers' (fp32), with chunked prefill."""
from __future__ import annotations

import os

import pytest
import torch

from fastinfer import SamplingParams
from fastinfer.ops.registry import OPS_WITHOUT_TRITON
from tests.models.test_moe_models import BATCH, _hf_greedy, _llm, moe_dir  # noqa: F401  (moe_dir: a fixture)

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_moe_model_on_triton_matches_hf(family, moe_dir):  # noqa: F811
    path, hf = moe_dir(family)
    llm = _llm(path, attention_backend="triton", enable_prefix_caching=False, max_num_batched_tokens=16)
    chosen = {op: b for op, b in llm.engine.worker.ops.chosen.items()
              if op not in OPS_WITHOUT_TRITON}  # no Triton kernels: cpp / torch
    assert set(chosen.values()) == {"triton"}, llm.engine.worker.ops.describe()
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    out = [o.outputs[0].token_ids for o in llm.generate(BATCH[:3], params, use_tqdm=False)]
    assert out == [_hf_greedy(hf, tok.encode(p), 8) for p in BATCH[:3]], family
