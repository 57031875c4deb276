"""The differentiable plain-torch forward (used for calibration by distillation) equals the serving forward."""
import pytest
import torch

from fastinfer.models.dense_forward import dense_logits
from tests.models.test_hf_parity import _prefill_logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama3rope", "mistral"])
@pytest.mark.parametrize("quantization", [None, "int4-g32"])
def test_dense_logits_match_the_paged_forward(tiny_llm, arch, quantization):
    """Same logits (fp32) for GQA, qkv bias (qwen2), tied embeddings + llama3 rope, a sliding window of 24
    (mistral, 40 tokens) and quantized layers (their weights dequantized)."""
    llm = tiny_llm(arch, quantization=quantization)
    model = llm.engine.runner.model
    ids = [(i * 7919) % 49000 + 5 for i in range(40)]
    ref = _prefill_logits(llm, ids)  # [T, V]
    with torch.no_grad():
        batched = dense_logits(model, torch.tensor([ids, ids]))  # [2, T, V]
    torch.testing.assert_close(batched[0], ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batched[1], batched[0])


def test_dense_logits_reject_more_tokens_than_positions(tiny_llm):
    model = tiny_llm("llama").engine.runner.model
    with pytest.raises(ValueError, match="exceed"):
        dense_logits(model, torch.zeros(1, 10_000, dtype=torch.long))


def test_dense_logits_are_differentiable_in_the_weights(tiny_llm):
    model = tiny_llm("llama").engine.runner.model
    layer = model.layers[0].mlp.down_proj
    w = layer.weight.detach().float().clone().requires_grad_(True)
    logits = dense_logits(model, torch.tensor([[5, 6, 7, 8]]), lambda m: w if m is layer else m.weight.float())
    logits.logsumexp(-1).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
