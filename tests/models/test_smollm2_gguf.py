"""The real SmolLM2-135M GGUF: our loader vs HF transformers loading the same file (fp32)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fastinfer import LLM, SamplingParams

# every test here runs the real model for tens of seconds: slow (tests/conftest.py starts slow files first)
pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "Here is a Python function that reverses a string:\n",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
    "To make a cup of tea, first",
]


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = os.path.split(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model, AutoTokenizer.from_pretrained(d, gguf_file=f)


@pytest.fixture(scope="module")
def smollm2_llm(smollm2_path):
    return LLM(smollm2_path, dtype="float32", max_model_len=1024, load_progress=False)


def test_tokenizer_and_chat_template_match_hf(hf_smollm2, smollm2_llm):
    _, hf_tok = hf_smollm2
    tok = smollm2_llm.get_tokenizer()
    for p in PROMPTS + ["  spaces\tand\nnewlines  ", "émoji 🤖 and 中文"]:
        assert tok.encode(p) == hf_tok.encode(p)
    msgs = [{"role": "user", "content": "Hi there"}]
    assert (tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            == hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))


def test_greedy_matches_hf_transformers(hf_smollm2, smollm2_llm):
    model, hf_tok = hf_smollm2
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outs = smollm2_llm.generate(PROMPTS, sp, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        ids = hf_tok.encode(prompt)
        with torch.inference_mode():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):]
        assert out.outputs[0].token_ids == ref.tolist(), prompt
        assert out.outputs[0].text == hf_tok.decode(ref, skip_special_tokens=True)


def test_dequantization_is_bit_exact_with_gguf(smollm2_path):
    import gguf

    from fastinfer.models.gguf_loader import GGUFFile, dequantize

    f = GGUFFile(smollm2_path)
    seen = set()
    for t in f.reader.tensors:
        if t.tensor_type.name in seen:
            continue
        seen.add(t.tensor_type.name)
        ours = dequantize(t).numpy()
        ref = gguf.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(ours.shape)
        assert ours.tobytes() == ref.tobytes(), t.name
    assert {"Q4_1", "Q8_0", "F32"} <= seen


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_dequantize_synthetic_blocks_bit_exact(qtype):
    """Every supported block type, on random data quantized by the gguf package itself."""
    import gguf

    from fastinfer.models.gguf_loader import dequantize

    kind = gguf.GGMLQuantizationType[qtype]
    x = np.random.default_rng(0).standard_normal((6, 96)).astype(np.float32)
    data = gguf.quantize(x, kind)

    class T:  # the slice of gguf.ReaderTensor that dequantize reads
        tensor_type = kind
        shape = [96, 6]

    T.data = data
    ours = dequantize(T).numpy()
    assert ours.tobytes() == gguf.dequantize(data, kind).astype(np.float32).reshape(6, 96).tobytes()


def test_ngram_speculation_is_token_identical_on_smollm2(smollm2_path, smollm2_llm):
    """The hard gate for speculative decoding on the real model (fp32): greedy output unchanged."""
    from pydoc_data.topics import topics  # real English text that ships with Python

    passages = [" ".join(topics[k].split())[:600] for k in ("assert", "for", "with")]
    spec = LLM(smollm2_path, dtype="float32", max_model_len=1024, load_progress=False,
               speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    prompts = [smollm2_llm.chat_prompt([{"role": "user", "content": f"{p}\n\nRepeat the passage above exactly."}])
               for p in passages]
    sp = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in smollm2_llm.generate(prompts, sp, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in spec.generate(prompts, sp, use_tqdm=False)]
    assert got == want
    assert spec.engine.spec_stats["accepted_tokens"] > 0
