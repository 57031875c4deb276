"""The generic path (transformers' own modules, fastinfer's paged attention) vs HF transformers, on tiny random
models of architectures fastinfer has no native class for: prefill logits, 32 greedy tokens (fp32) in a batch
of 8 mixed requests with prefix caching, seeded sampling, n-gram speculation; ``model_impl="transformers"`` on
a native family; and the clear errors for models the generic path cannot serve."""
from __future__ import annotations

import functools
import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import save_file

from fastinfer import LLM, SamplingParams
from fastinfer.config import EngineConfig
from fastinfer.models.loader import load_model
from tests.models.test_hf_parity import _hf_model, _prefill_logits

GENERIC_ARCHS = ("opt", "stablelm", "gptj")  # no native class: served by the generic path
SHARED = "In the beginning of the long winter the village gathered near the old stone bridge and"
PROMPTS = [
    SHARED + " waited",  # shares 16+ tokens with the next one: a prefix-cache hit
    SHARED + " sang songs of the harvest",
    "def fibonacci(n):\n    if n < 2:",
    "A short note",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 1, 2, 3, 4, 5, 6,",
    "The capital of France is",
    "Once upon a time there was a small robot who",
    "Hello",
]
SAMPLED = {1: 7, 4: 11, 6: 23}  # prompt index -> seed; the other five decode greedily


def _config(arch: str) -> transformers.PretrainedConfig:
    ids = dict(vocab_size=49152, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "opt":  # learned positions, LayerNorm, tied head, q scaled before attention (scaling=1)
        return transformers.OPTConfig(**ids, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                      max_position_embeddings=512, word_embed_proj_dim=64)
    if arch == "stablelm":  # partial rotary, GQA, LayerNorm
        return transformers.StableLmConfig(**ids, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if arch == "gptj":  # interleaved rotary on part of each head, parallel attention + MLP
        return transformers.GPTJConfig(**ids, n_embd=64, n_inner=128, n_layer=2, n_head=4, rotary_dim=8,
                                       n_positions=512, tie_word_embeddings=False)
    if arch == "mixtral":  # MoE: per-expert checkpoint tensors fused at load by transformers' conversions
        return transformers.MixtralConfig(**ids, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                          num_experts_per_tok=2, max_position_embeddings=512)
    if arch == "falcon":  # picks its attention class by implementation name: not servable
        return transformers.FalconConfig(**ids, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    if arch == "bloom":  # ALiBi, attention written by hand: never calls the attention interface
        return transformers.BloomConfig(**ids, hidden_size=64, n_layer=2, n_head=4)
    raise ValueError(arch)


@pytest.fixture(scope="module")
def generic_dir(tmp_path_factory, smollm2_tokenizer_dir):
    """arch -> directory with a tiny random HF model (fp32 safetensors) and the SmolLM2 tokenizer files."""

    @functools.cache
    def make(arch: str) -> str:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(_config(arch)).float()
        with torch.no_grad():  # larger weights than the default init: sharper, less tie-prone logits
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.08)
        d = tmp_path_factory.mktemp(f"generic-{arch}")
        model.save_pretrained(d, safe_serialization=True)
        shutil.copytree(smollm2_tokenizer_dir, d, dirs_exist_ok=True)
        return str(d)

    return make


def _hf_greedy(hf, ids: list[int], n: int = 32) -> list[int]:
    with torch.inference_mode():
        return hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()


def _llm(path: str, **kw) -> LLM:
    return LLM(path, dtype="float32", max_model_len=512, load_progress=False, **kw)


@pytest.mark.parametrize("arch", [*GENERIC_ARCHS, "mixtral"])
def test_prefill_logits_match_hf(arch, generic_dir, caplog):
    path = generic_dir(arch)
    hf = _hf_model(path)
    with caplog.at_level("INFO", logger="fastinfer"):  # Mixtral is native too: ask for the generic path
        llm = _llm(path, model_impl="transformers")
    assert llm.engine.worker.model_config.model_impl == "transformers"
    assert f"generic path: {type(hf).__name__} runs on transformers' own modules" in caplog.text
    assert ("through transformers' checkpoint conversions" in caplog.text) == (arch == "mixtral")
    for prompt in PROMPTS[:4]:
        ids = llm.get_tokenizer().encode(prompt)
        with torch.inference_mode():
            ref = hf(torch.tensor([ids])).logits[0].float()
        ours = _prefill_logits(llm, ids)
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() <= 1e-4 * max(ref.abs().max().item(), 1.0), (arch, prompt)


def _params(i: int) -> SamplingParams:
    if i in SAMPLED:
        return SamplingParams(temperature=0.9, top_p=0.95, seed=SAMPLED[i], max_tokens=32, ignore_eos=True)
    return SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


@pytest.mark.parametrize("arch", GENERIC_ARCHS)
def test_batch_of_mixed_requests_matches_hf(arch, generic_dir):
    path = generic_dir(arch)
    hf = _hf_model(path)
    llm = _llm(path, enable_prefix_caching=True)
    tok = llm.get_tokenizer()
    outs = llm.generate(PROMPTS, [_params(i) for i in range(len(PROMPTS))], use_tqdm=False)
    for i, (prompt, out) in enumerate(zip(PROMPTS, outs)):
        if i not in SAMPLED:
            assert out.outputs[0].token_ids == _hf_greedy(hf, tok.encode(prompt)), (arch, prompt)
    # again, in another order and batch, the prompts now in the prefix cache: seeded samples are a function of
    # the seed alone, greedy tokens stay HF's
    rerun = [*sorted(SAMPLED, reverse=True), 0]
    again = llm.generate([PROMPTS[i] for i in rerun], [_params(i) for i in rerun], use_tqdm=False)
    for i, out in zip(rerun, again):
        assert out.num_cached_tokens == (len(tok.encode(PROMPTS[i])) - 1) // 16 * 16  # every full prompt block
        assert out.outputs[0].token_ids == outs[i].outputs[0].token_ids, (arch, i)
        assert len(out.outputs[0].token_ids) == 32


def test_ngram_speculation_matches_hf(generic_dir):
    path = generic_dir("opt")
    hf = _hf_model(path)
    llm = _llm(path, speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    tok = llm.get_tokenizer()
    prompts = [PROMPTS[4], PROMPTS[2], "a b c a b c a b c a b c a b"]
    outs = llm.generate(prompts, _params(0), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == _hf_greedy(hf, tok.encode(prompt)), prompt
    assert llm.engine.spec_stats["draft_tokens"] > 0  # drafts were verified, not just plain decoding


# mistral: a 24-token sliding window, longer prompts; int8: a quantized KV cache (both paths rotate q and k alike)
@pytest.mark.parametrize("arch,kv", [("llama", "auto"), ("mistral", "auto"), ("llama", "int8")])
def test_model_impl_transformers_matches_native(arch, kv, tiny_model_dir, caplog):
    path = tiny_model_dir(arch)
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[6]]
    with caplog.at_level("INFO", logger="fastinfer"):
        native = _llm(path, kv_cache_dtype=kv).generate(prompts, sp, use_tqdm=False)
        assert "native" in caplog.text and "generic path" not in caplog.text
        generic = _llm(path, model_impl="transformers", kv_cache_dtype=kv).generate(prompts, sp, use_tqdm=False)
    assert "generic path: " in caplog.text
    assert [o.outputs[0].token_ids for o in generic] == [o.outputs[0].token_ids for o in native]


def test_cli_model_impl_flag(tiny_model_dir, capsys, caplog):
    from fastinfer.entrypoints.cli import main

    path = tiny_model_dir("llama")
    with caplog.at_level("INFO", logger="fastinfer"):
        assert main(["generate", path, "Hello there", "--max-tokens", "8", "--dtype", "float32",
                     "--max-model-len", "512", "--model-impl", "transformers"]) == 0
    assert "generic path: LlamaForCausalLM runs on transformers' own modules" in caplog.text
    want = _llm(path).generate("Hello there", SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert capsys.readouterr().out == want[0].outputs[0].text + "\n"


def _write_config(tmp_path, **cfg) -> str:
    with open(tmp_path / "config.json", "w") as fh:
        json.dump(cfg, fh)
    return str(tmp_path)


def test_clear_errors(generic_dir, tmp_path):
    with pytest.raises(ValueError, match="does not accept a custom attention implementation"):
        load_model(generic_dir("falcon"), "float32", progress=False)
    with pytest.raises(ValueError, match="never called transformers' attention interface"):
        load_model(generic_dir("bloom"), "float32", progress=False)
    with pytest.raises(ValueError, match="never runs remote code"):
        load_model(_write_config(tmp_path, architectures=["MyOwnForCausalLM"], model_type="my_own",
                                 auto_map={"AutoModelForCausalLM": "modeling_my_own.MyOwnForCausalLM"}))
    with pytest.raises(ValueError, match="unsupported architecture 'NoSuchForCausalLM'.*no causal-LM class"):
        load_model(_write_config(tmp_path, architectures=["NoSuchForCausalLM"], model_type="no_such"))
    with pytest.raises(ValueError, match="names the architecture GPTJForCausalLM but its model_type 'opt'"):
        load_model(_write_config(tmp_path, **{**_config("opt").to_dict(), "architectures": ["GPTJForCausalLM"]}))
    with pytest.raises(ValueError, match="model_impl='fastinfer': no native class for 'OPTForCausalLM'"):
        load_model(generic_dir("opt"), "float32", progress=False, model_impl="fastinfer")
    with pytest.raises(ValueError, match="not supported on the generic path"):
        load_model(generic_dir("opt"), "float32", progress=False, quantization="int8")
    extra = shutil.copytree(generic_dir("opt"), tmp_path / "extra")
    save_file({"decoder.no_such_layer.weight": torch.zeros(2, 2)}, str(extra / "extra.safetensors"))
    with pytest.raises(ValueError, match=r"\['decoder.no_such_layer.weight'\] have no place in transformers' OPT"):
        load_model(str(extra), "float32", progress=False)
    with pytest.raises(ValueError, match="model_impl must be one of"):
        EngineConfig(model="x", model_impl="vllm")
