"""The hard gate for draft-model speculation on the real SmolLM2-135M (fp32): greedy output token-identical to
plain decoding with a smaller sibling (its first 20 of 30 layers) as the draft and with the int4 self-draft,
in a KV pool small enough to preempt, over two passes (the second served from the prefix cache)."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from fastinfer import LLM, SamplingParams

DRAFT_LAYERS = 20
SP = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
TIGHT = {"num_kv_blocks": 30, "block_size": 16, "max_model_len": 400}  # prompts take 29 blocks, outputs 35


@pytest.fixture(scope="module")
def smollm2_sibling(smollm2_path, tmp_path_factory) -> str:
    """SmolLM2's first DRAFT_LAYERS layers (same embeddings, norm and tokenizer) as an HF directory."""
    from safetensors.torch import save_file

    from fastinfer.models.gguf_loader import GGUFFile
    from fastinfer.tokenizer import tokenizer_from_gguf

    d = str(tmp_path_factory.mktemp("smollm2-sibling"))
    gguf = GGUFFile(smollm2_path)
    cfg = gguf.model_config()
    tensors = {name: w.contiguous() for name, w in gguf.tensors(cfg, torch.float32)
               if ".layers." not in name or int(name.split(".layers.")[1].split(".")[0]) < DRAFT_LAYERS}
    save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(d, "config.json"), "w") as fh:
        json.dump(dataclasses.replace(cfg, num_hidden_layers=DRAFT_LAYERS).to_hf_dict(), fh)
    tokenizer_from_gguf(gguf).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def prompts_and_reference(smollm2_path):
    from pydoc_data.topics import topics  # real English text that ships with Python

    plain = LLM(smollm2_path, dtype="float32", max_model_len=400, load_progress=False)
    passages = [" ".join(topics[k].split())[:450] for k in ("assert", "for", "with")]
    prompts = [plain.chat_prompt([{"role": "user", "content": f"{p}\n\nRepeat the passage above exactly."}])
               for p in passages]
    return prompts, [o.outputs[0].token_ids for o in plain.generate(prompts, SP, use_tqdm=False)]


@pytest.mark.slow
@pytest.mark.parametrize("proposer", ["sibling_draft_model", "int4_self_draft"])
def test_draft_model_speculation_is_token_identical_on_smollm2(smollm2_path, smollm2_sibling,
                                                               prompts_and_reference, proposer):
    prompts, want = prompts_and_reference
    cfg = ({"method": "draft_model", "model": smollm2_sibling} if proposer == "sibling_draft_model"
           else {"method": "draft_model", "quantization": "int4"})
    cfg["cost_aware"] = False  # always draft (a poor draft would rightly be switched off)
    spec = LLM(smollm2_path, dtype="float32", load_progress=False, speculative_config=cfg, **TIGHT)
    for _ in range(2):  # the second pass starts from prefix-cache hits
        assert [o.outputs[0].token_ids for o in spec.generate(prompts, SP, use_tqdm=False)] == want
    eng = spec.engine
    assert eng.scheduler.num_preemptions > 0 and eng.kv.prefix_hits > 0
    assert eng.spec_stats["accepted_tokens"] > 0
    assert eng.kv.pool.num_free_blocks == eng.num_kv_blocks
