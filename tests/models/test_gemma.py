"""Gemma 2 and Gemma 3 (text) vs HF transformers on tiny random models with both layer kinds (sliding window 16,
global), soft-capping that bites (Gemma 2: attention and final logits; Gemma 3: final logits), zero-centred norm
weights that are not zero, a query_pre_attn_scalar other than head_dim, and Gemma 3's own RoPE per layer kind
(linear scaling on the global layers): prefill logits (fp32) and 32 greedy tokens with prefix caching, prompts
longer than the window and chunked prefill across its edge, on the torch, cpp and Triton backends."""
from __future__ import annotations

import pytest
import torch
import transformers

from fastinfer import LLM, SamplingParams
from fastinfer.models.gemma import layer_types, rope_params
from fastinfer.models.interface import forward_sequence, scratch_kv_cache
from fastinfer.models.loader import load_model
from tests.conftest import save_tiny_model

WINDOW = 16
SHARED = ("In the beginning of the long winter the village gathered near the old stone bridge to hear the stories "
          "that the travelling miller told every year, and the children sat closest to the fire")
PROMPTS = [SHARED + " while he spoke about the sea", SHARED + " of the first snow", "A short note"]
NEW_TOKENS = 32


def _config(arch: str) -> transformers.PretrainedConfig:
    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=512, sliding_window=WINDOW,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "gemma2":
        return transformers.Gemma2Config(**common, query_pre_attn_scalar=24, attn_logit_softcapping=1.5,
                                         final_logit_softcapping=3.0)
    return transformers.Gemma3TextConfig(**common, query_pre_attn_scalar=32, final_logit_softcapping=5.0,
                                         sliding_window_pattern=2, rope_theta=50000.0, rope_local_base_freq=500.0,
                                         rope_scaling={"rope_type": "linear", "factor": 2.0})


@pytest.fixture(scope="module")
def gemma(tmp_path_factory, smollm2_tokenizer_dir):
    """arch -> (directory of a tiny random model with the SmolLM2 tokenizer, the HF model, HF's greedy tokens for
    each of PROMPTS)."""
    cache: dict[str, tuple[str, transformers.PreTrainedModel, list[list[int]]]] = {}

    def make(arch: str):
        if arch not in cache:
            torch.manual_seed(0)
            cls = transformers.Gemma2ForCausalLM if arch == "gemma2" else transformers.Gemma3ForCausalLM
            model = cls(_config(arch)).float().eval()
            with torch.no_grad():  # sharper logits than the default init; norms away from their zero centre
                for p in model.parameters():
                    p.normal_(0, 0.08 if p.dim() == 2 else 0.3)
            path = save_tiny_model(model, tmp_path_factory.mktemp(arch), smollm2_tokenizer_dir)
            model.generation_config.eos_token_id = None
            model.generation_config.pad_token_id = 0
            tok = transformers.AutoTokenizer.from_pretrained(path)
            greedy = []
            for prompt in PROMPTS:
                ids = tok.encode(prompt, add_special_tokens=False)
                with torch.inference_mode():
                    out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
                greedy.append(out[0, len(ids):].tolist())
            cache[arch] = path, model, greedy
        return cache[arch]

    return make


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_prefill_logits_match_hf(arch, gemma):
    path, hf, _ = gemma(arch)
    loaded = load_model(path, "float32", progress=False)
    assert type(loaded.model).__name__ == type(hf).__name__
    assert [s.sliding_window for s in loaded.model.kv_cache_spec()] == [WINDOW, None, WINDOW, None]
    for prompt in PROMPTS:
        ids = loaded.tokenizer.encode(prompt)
        with torch.inference_mode(), scratch_kv_cache(loaded.model, len(ids)):
            ours = loaded.model.compute_logits(forward_sequence(loaded.model, ids))
            ref = hf(torch.tensor([ids])).logits[0].float()
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() <= 1e-4 * max(ref.abs().max().item(), 1.0), (arch, prompt)


@pytest.mark.parametrize("arch,backend,new_tokens", [
    ("gemma2", "torch", NEW_TOKENS), ("gemma3", "torch", NEW_TOKENS),
    ("gemma2", "cpp", NEW_TOKENS), ("gemma3", "cpp", NEW_TOKENS),
    ("gemma2", "triton", 6),  # the Triton interpreter is slow on CPU: fewer tokens (the full 32 on a GPU)
])
def test_greedy_tokens_match_hf_generate(arch, backend, new_tokens, gemma):
    """The first prompt alone, then the other two: the second reuses the first's cached blocks (past the window);
    chunks of at most 24 tokens split the prompts across the window's edge."""
    if backend == "cpp":
        pytest.importorskip("fastinfer._C", reason="compiled extension not built")
    if backend == "triton":
        pytest.importorskip("triton")
        new_tokens = NEW_TOKENS if torch.cuda.is_available() else new_tokens
    path, _, greedy = gemma(arch)
    llm = LLM(path, dtype="float32", max_model_len=256, block_size=8, max_num_batched_tokens=24,
              enable_prefix_caching=True, attention_backend=backend, load_progress=False)
    assert llm.engine.worker.ops.chosen["paged_attention"] == backend
    assert len(llm.get_tokenizer().encode(PROMPTS[0])) > WINDOW + 24
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    outs = llm.generate(PROMPTS[:1], params, use_tqdm=False) + llm.generate(PROMPTS[1:], params, use_tqdm=False)
    assert outs[1].num_cached_tokens > WINDOW
    for prompt, out, ref in zip(PROMPTS, outs, greedy):
        assert out.outputs[0].token_ids == ref[:new_tokens], (arch, backend, prompt)


def test_legacy_config_keys_read_as_transformers_reads_them():
    """rope_theta / rope_scaling / rope_local_base_freq / sliding_window_pattern (older config.json files) give
    the same RoPE and layer kinds as the nested rope_parameters and layer_types transformers 5 writes."""
    legacy = dict(num_hidden_layers=7, sliding_window=64, sliding_window_pattern=3, rope_theta=40000.0,
                  rope_local_base_freq=700.0, rope_scaling={"rope_type": "linear", "factor": 4.0})
    nested = transformers.Gemma3TextConfig(**legacy).to_dict()
    assert layer_types(legacy, 7, 6) == layer_types(nested, 7, 6) == nested["layer_types"]
    for kind in ("sliding_attention", "full_attention"):
        theta, scaling = rope_params(legacy, kind, "rope_local_base_freq", 1e6)
        assert (theta, scaling) == rope_params(nested, kind, "rope_local_base_freq", 1e6)
        assert theta == nested["rope_parameters"][kind]["rope_theta"]
    assert rope_params(legacy, "full_attention", "rope_local_base_freq", 1e6)[1]["factor"] == 4.0
    assert rope_params(legacy, "sliding_attention", "rope_local_base_freq", 1e6)[1] is None


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="layer_types must list 4"):
        layer_types({"layer_types": ["full_attention"] * 3, "sliding_window": 8}, 4, 2)
    with pytest.raises(ValueError, match="sliding_window"):
        layer_types({"layer_types": ["sliding_attention"] * 2}, 2, 2)
    with pytest.raises(ValueError, match="sliding_window_pattern"):
        layer_types({"sliding_window_pattern": 0, "sliding_window": 8}, 4, 2)
