"""Native Mixture-of-Experts families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) vs HF transformers on tiny random
models built here (hidden 64, 2 layers, 8 experts, top-2, fp32): prefill logits and 32 greedy tokens for a batch
of mixed prompts with chunked prefill and prefix-cache hits, the same tokens under preemption, checkpoints with
per-expert and stacked expert tensors, the router against HF's, and int8 / int4 quantized experts against the float
model over their dequantized weights."""
from __future__ import annotations

import functools

import pytest
import torch
import transformers

from fastinfer import LLM, SamplingParams
from fastinfer.layers.moe import TopKRouter
from fastinfer.models.interface import forward_sequence, scratch_kv_cache
from fastinfer.models.loader import describe_quantization, load_model, save_quantized
from tests.conftest import save_tiny_model
from tests.models.test_families import BATCH
from tests.models.test_hf_parity import _hf_model, _prefill_logits

COMMON = dict(vocab_size=49152, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, bos_token_id=1, eos_token_id=2, num_experts_per_tok=2)
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
PREEMPTED = ("mixtral", "qwen2_moe")  # preemption is the engine's; two families (with and without a shared expert)


def _config(family: str) -> transformers.PretrainedConfig:
    if family == "mixtral":  # renormalised top-2, untied head
        return transformers.MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=8)
    if family == "qwen2_moe":  # q/k/v bias, shared expert + sigmoid gate, no renormalisation, layer 1 dense
        return transformers.Qwen2MoeConfig(**COMMON, intermediate_size=128, moe_intermediate_size=48, num_experts=8,
                                           shared_expert_intermediate_size=96, norm_topk_prob=False,
                                           mlp_only_layers=[1])
    if family == "qwen3_moe":  # per-head q/k norm, head_dim != hidden / heads, renormalised
        return transformers.Qwen3MoeConfig(**COMMON, intermediate_size=128, moe_intermediate_size=48, num_experts=8,
                                           head_dim=32, norm_topk_prob=True)
    if family == "qwen3_moe_i64":  # experts with I = 64, for int4 groups of 32
        return transformers.Qwen3MoeConfig(**COMMON, intermediate_size=128, moe_intermediate_size=64, num_experts=8,
                                           head_dim=32, norm_topk_prob=True)
    if family == "olmoe":  # q/k norm over the whole projections, clip_qkv, no renormalisation
        return transformers.OlmoeConfig(**COMMON, intermediate_size=48, num_experts=8, clip_qkv=2.0)
    raise ValueError(family)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, smollm2_tokenizer_dir):
    """family -> (directory with a tiny random HF model + tokenizer, the HF model). Every parameter random; the
    routers sharper than the rest so that top-2 choices are not near-ties."""

    @functools.cache
    def make(family: str):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(_config(family)).float()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("gate.weight") and p.shape[0] == 8:  # the router
                    p.normal_(0, 0.5)
                elif p.dim() >= 2:
                    p.normal_(0, 0.08)
                elif name.endswith("bias"):
                    p.normal_(0, 0.05)
                else:  # norm weights
                    p.normal_(1.0, 0.1)
        d = save_tiny_model(model, tmp_path_factory.mktemp(f"moe-{family}"), smollm2_tokenizer_dir)
        return d, _hf_model(d)

    return make


def _llm(path: str, **kw) -> LLM:
    kw.setdefault("max_model_len", 512)
    return LLM(path, dtype="float32", load_progress=False, **kw)


def _hf_greedy(hf, ids: list[int], n: int = 32) -> list[int]:
    with torch.inference_mode():
        return hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()


GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_family_matches_hf(family, moe_dir, caplog):
    path, hf = moe_dir(family)
    with caplog.at_level("INFO", logger="fastinfer"):
        llm = _llm(path, enable_prefix_caching=True, max_num_batched_tokens=16)  # prompts prefill in chunks
    model = llm.engine.worker.model
    assert llm.engine.worker.model_config.model_impl == "fastinfer" and "native" in caplog.text
    assert len(model.moe_layers()) == (1 if family == "qwen2_moe" else 2)  # Qwen2-MoE: layer 1 in mlp_only_layers
    tok = llm.get_tokenizer()
    ids = [tok.encode(p) for p in BATCH]
    assert max(len(i) for i in ids) > 16  # several chunks
    for prompt_ids in ids:
        with torch.inference_mode():
            ref = hf(torch.tensor([prompt_ids])).logits[0].float()  # [T, V]
        ours = _prefill_logits(llm, prompt_ids)
        assert (ours - ref).abs().max().item() <= 1e-4 * max(ref.abs().max().item(), 1.0), (family, prompt_ids)
    first = [o.outputs[0].token_ids for o in llm.generate(BATCH, GREEDY, use_tqdm=False)]  # one mixed batch
    assert first == [_hf_greedy(hf, i) for i in ids], family
    again = llm.generate(BATCH[::-1], GREEDY, use_tqdm=False)  # full prompt blocks now from the prefix cache
    assert [o.outputs[0].token_ids for o in again] == first[::-1]
    assert all(o.num_cached_tokens >= 16 for o in again if len(o.prompt_token_ids) > 16)
    if family not in PREEMPTED:
        return
    tight = _llm(path, num_kv_blocks=20, block_size=4, max_model_len=64, enable_prefix_caching=False)
    assert [o.outputs[0].token_ids for o in tight.generate(BATCH, GREEDY, use_tqdm=False)] == first
    assert tight.engine.scheduler.num_preemptions > 0, family


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode(), scratch_kv_cache(model, len(ids)):
        return model.compute_logits(forward_sequence(model, ids))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_stacked_expert_tensors_load_as_per_expert_ones(family, moe_dir):
    """transformers 5 holds experts stacked (``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj``);
    its in-memory state dict loads into the same model as the per-expert checkpoint on disk."""
    path, hf = moe_dir(family)
    state = hf.state_dict()
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state) and not any(".experts.0." in k for k in state)
    disk = load_model(path, "float32", progress=False).model
    fresh = load_model(path, "float32", progress=False).model
    with torch.no_grad():
        for layer in fresh.moe_layers():
            layer.experts.w13.weight.zero_()
            layer.experts.w2.weight.zero_()
    fresh.load_weights(state.items())
    ids = list(range(100, 130))
    assert torch.equal(_logits(fresh, ids), _logits(disk, ids))
    with pytest.raises(ValueError, match="missing"):
        fresh.load_weights((k, v) for k, v in state.items() if not k.endswith("experts.down_proj"))
    with pytest.raises(ValueError, match="expert 8, the model has 8"):
        fresh.load_weights([("model.layers.0.mlp.experts.8.down_proj.weight", torch.zeros(64, 48))])


@pytest.mark.parametrize("renormalize", [True, False])
def test_router_matches_hf(renormalize):
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

    cfg = transformers.Qwen2MoeConfig(hidden_size=64, num_experts=8, num_experts_per_tok=3, norm_topk_prob=renormalize)
    hf = Qwen2MoeTopKRouter(cfg)
    torch.nn.init.normal_(hf.weight, std=0.5)
    ours = TopKRouter(64, 8, 3, renormalize, torch.float32)
    ours.weight.data.copy_(hf.weight.data)
    x = torch.randn(37, 64)
    _, ref_w, ref_ids = hf(x)
    w, ids = ours(x)
    assert torch.equal(ids, ref_ids) and torch.allclose(w, ref_w, atol=1e-6)
    assert torch.allclose(w.sum(-1), torch.ones(37)) == renormalize
    with pytest.raises(ValueError, match="top_k"):
        TopKRouter(64, 4, 5, True, torch.float32)


@pytest.mark.parametrize("method", ["int8", "int4-g32"])
def test_quantized_experts_are_their_dequantized_model(method, moe_dir, caplog, tmp_path):
    """``quantization=`` quantizes the experts too (stacked int8 / int4, read by ``fused_moe`` as they are): the
    logits equal those of the float model whose every quantized weight (experts, dense projections, head) is
    replaced by its dequantization, differ from the float model's (int8: by under 5%), and survive save + load bit
    for bit; the engine serves the quantized model, a batch giving each prompt's own tokens."""
    path, _ = moe_dir("qwen3_moe_i64")  # experts' I = 64: int4 groups of 32 fit both projections
    dense = load_model(path, "float32", progress=False).model
    with caplog.at_level("INFO", logger="fastinfer"):
        loaded = load_model(path, "float32", progress=False, quantization=method)
    q = loaded.model
    assert f"quantized ({method}) experts of 2 of 2 MoE layers" in caplog.text
    bits = 8 if method == "int8" else 4
    assert describe_quantization(q).count(f"int{bits} g") >= 2 and "experts x4" in describe_quantization(q)
    twin = load_model(path, "float32", progress=False).model  # the float model with the dequantized weights
    with torch.no_grad():
        for name, m in q.quantizable_layers().items():
            twin.get_submodule(name).weight.data.copy_(m.quant.dequantize())
        for block, tblock in zip(q.moe_layers(), twin.moe_layers(), strict=True):
            for proj in ("w13", "w2"):
                stacked = getattr(block.experts, proj)
                assert stacked.weight is None and stacked.quant.bits == bits
                getattr(tblock.experts, proj).weight.data.copy_(stacked.quant.dequantize())
    ids = list(range(100, 140))
    ref, got, float_ref = _logits(twin, ids), _logits(q, ids), _logits(dense, ids)
    assert (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    err = (got - float_ref).abs().max().item() / float_ref.abs().max().item()
    assert err > 0 and (bits == 4 or err < 0.05), err  # int4 on a random 64-wide model moves logits a lot
    back = load_model(save_quantized(loaded, str(tmp_path / "q"), method), "float32", progress=False).model
    assert torch.equal(_logits(back, ids), got)
    llm = _llm(path, quantization=method)
    batch = [o.outputs[0].token_ids for o in llm.generate(BATCH, GREEDY, use_tqdm=False)]
    assert batch == [llm.generate(p, GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in BATCH]


def test_expert_load_counts_every_routed_token_and_reaches_the_metrics(moe_dir):
    """Each forwarded token counts once per chosen expert in each MoE layer: after a batch (no prefix cache, so
    every prompt token is computed; a request forwards its prompt and all but its last generated token) each
    layer's counts sum to top_k x the forwarded tokens, several experts get tokens, and the server's Prometheus
    text carries the same numbers per (layer, expert)."""
    from types import SimpleNamespace

    from fastinfer.entrypoints.metrics import ServerMetrics

    path, _ = moe_dir("mixtral")
    llm = _llm(path, enable_prefix_caching=False)
    assert llm.engine.expert_load() == {0: [0] * 8, 1: [0] * 8}
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    outs = llm.generate(BATCH, params, use_tqdm=False)
    forwarded = sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) - 1 for o in outs)
    load = llm.engine.expert_load()
    assert sorted(load) == [0, 1]
    for counts in load.values():
        assert sum(counts) == 2 * forwarded and sum(c > 0 for c in counts) >= 3, counts
    text = ServerMetrics(lambda: SimpleNamespace(engine=llm.engine, num_in_flight=0), "tiny").render()[0].decode()
    for layer, counts in load.items():
        for expert, n in enumerate(counts):
            labels = f'expert="{expert}",layer="{layer}",model_name="tiny"'
            line = f"fastinfer_moe_expert_tokens_total{{{labels}}} {float(n)}"
            assert line in text, line
