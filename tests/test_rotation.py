"""Rotation before quantization: orthonormal matrices, and a rotated model computes the same function."""
import pytest
import torch

from fastinfer.quantization.rotation import hadamard, random_orthogonal, rotate_model
from tests.models.test_hf_parity import _prefill_logits


@pytest.mark.parametrize("n", [1, 2, 12, 24, 64, 144, 576, 1536])
def test_hadamard_is_orthonormal_with_equal_magnitudes(n):
    h = hadamard(n)
    assert h is not None and h.shape == (n, n)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64))
    torch.testing.assert_close(h.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64))


@pytest.mark.parametrize("n", [9, 40, 100])
def test_sizes_without_a_construction_fall_back_to_random_orthogonal(n):
    assert hadamard(n) is None
    q = random_orthogonal(n, torch.Generator().manual_seed(1))
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64))
    assert not torch.equal(q, random_orthogonal(n, torch.Generator().manual_seed(2)))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama3rope"])
def test_rotated_model_computes_the_same_logits(tiny_llm, arch):
    """Untied (llama), qkv bias with 4 KV heads (qwen2), tied embeddings with 1 KV head (llama3rope)."""
    llm = tiny_llm(arch)
    model = llm.engine.worker.model
    ids = list(range(300, 340))
    ref = _prefill_logits(llm, ids)
    w_before = model.layers[0].self_attn.qkv_proj.weight.clone()
    desc = rotate_model(model, seed=3)
    assert "hadamard 64x64" in desc and "16x16" in desc
    assert not torch.allclose(model.layers[0].self_attn.qkv_proj.weight, w_before)  # really rotated
    assert float(model.layers[0].input_layernorm.weight.min()) == 1.0 == float(model.norm.weight.max())
    assert model.lm_head is not None and not model.config.tie_word_embeddings
    torch.testing.assert_close(_prefill_logits(llm, ids), ref, rtol=1e-4, atol=1e-4)


def test_rotation_refuses_a_quantized_model(tiny_llm):
    model = tiny_llm("llama", quantization="int8").engine.worker.model
    with pytest.raises(ValueError, match="float model"):
        rotate_model(model)
