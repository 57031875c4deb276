"""Native families beyond Llama (Qwen3, Phi-3, GPT-2, GPT-NeoX) vs HF transformers on tiny random models built
here from their transformers configs: prefill logits and 32 greedy tokens (fp32) for a batch of prompts, chunked
prefill and prefix-cache hits included; int8 quantization keeps logits close and survives save -> reload."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from fastinfer import LLM, SamplingParams
from fastinfer.models.interface import forward_sequence, scratch_kv_cache
from fastinfer.models.loader import describe_quantization, load_model, save_quantized
from tests.models.test_hf_parity import PROMPTS, _hf_model, _prefill_logits

# one prompt past the 24-token windows (and several 16-token blocks / prefill chunks)
BATCH = [*PROMPTS, "Rivers carry water from the mountains down to the sea, and along the way they shape valleys, "
         "feed farms and give cities a reason to exist"]
COMMON = dict(vocab_size=49152, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512,
              bos_token_id=1, eos_token_id=2)


def _config(family: str):
    import transformers

    if family == "qwen3":  # q/k norms, head_dim != hidden / heads, GQA, output bias
        return transformers.Qwen3Config(**COMMON, intermediate_size=128, num_key_value_heads=2, head_dim=32,
                                        attention_bias=True, tie_word_embeddings=True)
    if family == "qwen3_window":  # layer 0 full attention, layer 1 a 24-token window (layer_types)
        return transformers.Qwen3Config(**COMMON, intermediate_size=128, num_key_value_heads=2, head_dim=16,
                                        use_sliding_window=True, sliding_window=24, max_window_layers=1)
    if family == "phi3":  # fused checkpoint projections, longrope + partial rotary, sliding window
        half_rot = 16 * 3 // 4 // 2
        return transformers.Phi3Config(**COMMON, intermediate_size=128, num_key_value_heads=2, sliding_window=24,
                                       original_max_position_embeddings=128, partial_rotary_factor=0.75,
                                       rope_scaling={"rope_type": "longrope",
                                                     "short_factor": [1.0 + 0.1 * i for i in range(half_rot)],
                                                     "long_factor": [2.0 + 0.5 * i for i in range(half_rot)]},
                                       tie_word_embeddings=False)
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=49152, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                                       bos_token_id=1, eos_token_id=2)
    if family in ("neox", "neox_sequential"):
        return transformers.GPTNeoXConfig(**COMMON, intermediate_size=128, rotary_pct=0.5,
                                          use_parallel_residual=family == "neox")
    raise ValueError(family)


FAMILIES = ("qwen3", "qwen3_window", "phi3", "gpt2", "neox", "neox_sequential")


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory, smollm2_tokenizer_dir):
    """Factory: family -> directory with a tiny random HF model (fp32 safetensors) + the SmolLM2 tokenizer.
    Every parameter is random (biases and norm weights too, so loading them is tested)."""
    from transformers import AutoModelForCausalLM

    cache: dict[str, str] = {}

    def make(family: str) -> str:
        if family not in cache:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(_config(family)).to(torch.float32)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if p.dim() == 2:
                        p.normal_(0, 0.08)
                    elif name.endswith("bias"):
                        p.normal_(0, 0.05)
                    else:  # norm weights
                        p.normal_(1.0, 0.1)
            d = tmp_path_factory.mktemp(f"family-{family}")
            model.save_pretrained(d, safe_serialization=True)
            for f in os.listdir(smollm2_tokenizer_dir):
                shutil.copy(os.path.join(smollm2_tokenizer_dir, f), d)
            cache[family] = str(d)
        return cache[family]

    return make


def _llm(path: str, **kw) -> LLM:
    return LLM(path, dtype="float32", max_model_len=512, load_progress=False, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_hf_logits_and_greedy(family, family_dir):
    path = family_dir(family)
    hf = _hf_model(path)
    llm = _llm(path, enable_prefix_caching=True, max_num_batched_tokens=16)  # prompts prefill in chunks
    tok = llm.get_tokenizer()
    ids = [tok.encode(p) for p in BATCH]
    assert max(len(i) for i in ids) > 24  # past the 24-token windows and over several chunks
    windows = [s.sliding_window for s in llm.engine.worker.model.kv_cache_spec()]
    assert windows == {"qwen3_window": [None, 24], "phi3": [24, 24]}.get(family, [None, None])
    for prompt_ids in ids:
        with torch.inference_mode():
            ref = hf(torch.tensor([prompt_ids])).logits[0].float()  # [T, V]
        ours = _prefill_logits(llm, prompt_ids)
        assert (ours - ref).abs().max().item() <= 1e-4 * max(ref.abs().max().item(), 1.0), (family, prompt_ids)
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    first = [o.outputs[0].token_ids for o in llm.generate(BATCH, sp, use_tqdm=False)]
    for prompt_ids, out in zip(ids, first):
        with torch.inference_mode():
            ref_ids = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=32, do_sample=False)[0, len(prompt_ids):]
        assert out == ref_ids.tolist(), (family, prompt_ids)
    again = llm.generate(BATCH, sp, use_tqdm=False)  # the prompts' full blocks now come from the prefix cache
    assert [o.outputs[0].token_ids for o in again] == first
    assert all(o.num_cached_tokens >= 16 for o in again if len(o.prompt_token_ids) > 16)


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode(), scratch_kv_cache(model, len(ids)):
        return model.compute_logits(forward_sequence(model, ids))


@pytest.mark.parametrize("family", FAMILIES)
def test_family_int8_logits_stay_close_and_save_reload(family, family_dir, tmp_path):
    path = family_dir(family)
    ids = list(range(100, 140))
    dense = load_model(path, "float32", progress=False)
    q = load_model(path, "float32", progress=False, quantization="int8")
    assert describe_quantization(q.model).startswith("int8")
    assert all(m.quantized for m in q.model.quantizable_layers().values())  # the lm_head too
    ref, got = _logits(dense.model, ids), _logits(q.model, ids)
    err = (got - ref).abs().max().item() / ref.abs().max().item()
    print(f"{family}: int8 max logit error {err:.4f} of the largest logit")
    assert err < 0.05, (family, err)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.75  # random tiny models: near-ties
    out = save_quantized(q, str(tmp_path / family), "int8")
    back = load_model(out, "float32", progress=False)
    assert describe_quantization(back.model) == describe_quantization(q.model)
    assert torch.equal(_logits(back.model, ids), got)


def test_longrope_cache_matches_hf_on_both_sides_of_the_original_length(family_dir):
    """Positions below original_max_position_embeddings use the short factors, those past it the long ones (HF
    picks one set per sequence by its length; each side must match the cache rows there)."""
    from transformers import AutoConfig
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    from fastinfer.config import ModelConfig
    from fastinfer.layers.rotary import rotary_from_config
    from fastinfer.ops import OpSet

    cfg = AutoConfig.from_pretrained(family_dir("phi3"))
    ours = rotary_from_config(ModelConfig.from_hf_dict(cfg.to_dict()), OpSet("cpu")).cos_sin_cache  # [P, rot]
    hf = Phi3RotaryEmbedding(cfg)
    orig, rot = 128, ours.shape[1]
    x = torch.zeros(1, dtype=torch.float32)
    for n, rows in ((orig, slice(0, orig)), (300, slice(orig, 300))):
        cos, sin = hf(x, torch.arange(n)[None])  # [1, n, rot] (the angles twice)
        assert torch.allclose(ours[rows, :rot // 2], cos[0, rows, :rot // 2], atol=1e-5)
        assert torch.allclose(ours[rows, rot // 2:], sin[0, rows, :rot // 2], atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_config_reads_hf_names_and_round_trips(family, family_dir):
    """GPT-2's n_embd / n_head / n_layer / n_inner (null: 4 x hidden) / layer_norm_epsilon, NeoX's layer_norm_eps
    read as the common fields; to_hf_dict reads back to an equal config."""
    import json

    from fastinfer.config import ModelConfig

    with open(os.path.join(family_dir(family), "config.json")) as fh:
        raw = json.load(fh)
    cfg = ModelConfig.from_hf_dict(raw)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers) == (64, 4, 2)
    assert cfg.intermediate_size == (256 if family == "gpt2" else 128)
    assert cfg.rms_norm_eps == raw.get("rms_norm_eps", raw.get("layer_norm_eps", raw.get("layer_norm_epsilon")))
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
