"""Distillation of the group parameters: codes stay, scales move, the KL to the float model goes down."""
import copy

import pytest
import torch

from fastinfer.quantization.tune import teacher_targets, tune_group_params


def test_tuning_lowers_the_kl_and_keeps_the_codes(tiny_llm):
    llm = tiny_llm("llama")
    model = llm.engine.worker.model
    seqs = [[(i * 37 + j * 11) % 4000 + 10 for i in range(64)] for j in range(2)]
    targets = teacher_targets(model, seqs, top_k=32)
    assert targets.logprobs.shape == (2, 64, 32) and targets.indices.shape == (2, 64, 32)
    model.quantize("int4", 32)
    before = {n: (m.quant.qweight.clone(), m.quant.scales.clone()) for n, m in model.quantizable_layers().items()}
    first = tune_group_params(copy.deepcopy(model), targets, steps=1, batch_size=2)
    report = tune_group_params(model, targets, steps=12, batch_size=2, lr=3e-3)
    assert report.first_loss == pytest.approx(first.first_loss, rel=1e-5)
    again = tune_group_params(copy.deepcopy(model), targets, steps=1, batch_size=2, lr=0.0)
    assert again.first_loss < 0.8 * report.first_loss, (report, again)  # the tuned model is closer to float
    for name, m in model.quantizable_layers().items():
        q0, s0 = before[name]
        assert torch.equal(m.quant.qweight, q0)  # codes frozen
        assert torch.equal(m.quant.scales, s0) == (name == "lm_head")  # the lm_head is skipped by default
        assert m.quant.scales.dtype == s0.dtype


def test_tuning_needs_a_quantized_model_and_equal_lengths(tiny_llm):
    model = tiny_llm("llama").engine.worker.model
    with pytest.raises(ValueError, match="one length"):
        teacher_targets(model, [[1, 2, 3], [1, 2]])
    targets = teacher_targets(model, [[1, 2, 3]])
    with pytest.raises(ValueError, match="quantized model"):
        tune_group_params(model, targets, steps=1)


def test_coarse_kl_is_the_kl_of_top_k_plus_a_tail_bucket():
    from fastinfer.quantization.tune import coarse_kl

    torch.manual_seed(0)
    p = torch.log_softmax(torch.randn(3, 50), -1)
    q = torch.log_softmax(torch.randn(3, 50), -1)
    full = (p.exp() * (p - q)).sum(-1).mean()
    torch.testing.assert_close(coarse_kl(p, q), full, rtol=1e-4, atol=1e-6)  # k = V: the exact KL
    top = p.topk(5, -1).indices
    assert float(coarse_kl(p.gather(-1, top), p.gather(-1, top))) == pytest.approx(0.0, abs=1e-6)
    # A student that drops the tail mass is penalized (a top-k-only loss would score it below the teacher).
    sharp = torch.full_like(p, -30.0).scatter(-1, top, p.gather(-1, top) - torch.logsumexp(p.gather(-1, top), -1,
                                                                                              keepdim=True))
    assert float(coarse_kl(p.gather(-1, top), sharp.gather(-1, top))) > 0.05
    restricted = (p.gather(-1, top).exp() * (p.gather(-1, top) - sharp.gather(-1, top))).sum(-1).mean()
    assert float(restricted) < 0  # the failure mode the tail bucket removes


@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama3rope", "mistral"])
@pytest.mark.parametrize("quantization", [None, "int4-g32"])
def test_the_tuning_forward_is_the_serving_forward(tiny_llm, arch, quantization):
    """Tuning differentiates the model's own forward (plain-torch ops, a scratch paged cache, packed rows): the
    same logits as the engine's forward for GQA, qkv bias (qwen2), tied embeddings + llama3 rope, a sliding
    window of 24 (mistral, 40 tokens) and quantized layers; the engine's caches and op set are given back."""
    from fastinfer.quantization.tune import model_logits
    from tests.models.test_hf_parity import _prefill_logits

    llm = tiny_llm(arch, quantization=quantization)
    model = llm.engine.worker.model
    own_ops = {id(m): m.ops for m in model.modules() if hasattr(m, "ops")}
    caches = model.kv_caches
    ids = [(i * 7919) % 49000 + 5 for i in range(40)]
    ref = _prefill_logits(llm, ids)  # [T, V]
    with torch.no_grad():
        batched = model_logits(model, torch.tensor([ids, ids]))  # [2, T, V]
    torch.testing.assert_close(batched[0], ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batched[1], batched[0])
    assert model.kv_caches is caches and {id(m): m.ops for m in model.modules() if hasattr(m, "ops")} == own_ops
    torch.testing.assert_close(_prefill_logits(llm, ids), ref)


def test_the_tuning_forward_is_differentiable_in_the_group_scales(tiny_llm):
    from fastinfer.quantization.format import QuantizedWeight
    from fastinfer.quantization.tune import model_logits

    model = tiny_llm("llama", quantization="int4-g32").engine.worker.model
    layer = model.quantizable_layers()["layers.0.mlp.down_proj"]
    qw = layer.quant
    log_scale = torch.zeros_like(qw.scales, requires_grad=True)
    layer.quant = QuantizedWeight(qw.bits, qw.group_size, qw.qweight, qw.scales * log_scale.exp(), qw.mins)
    try:
        model_logits(model, torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])).logsumexp(-1).sum().backward()
    finally:
        layer.quant = qw
    assert log_scale.grad is not None and log_scale.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="exceed"):
        model_logits(model, torch.zeros(1, 10_000, dtype=torch.long))
