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


@pytest.mark.parametrize("n", [1, 16, 64, 80, 96, 100, 256])
def test_kv_key_rotation_is_orthonormal_for_every_head_size(n):
    """The quantized KV cache's q/k rotation: the Hadamard matrix of the order, or a block-diagonal one of the largest
    power-of-two block (80 = 5 x 16, 100 = 25 x 4), always orthonormal, so scores are unchanged."""
    from fastinfer.layers.kv_rotation import hadamard as kv_hadamard

    h = kv_hadamard(n, torch.float64)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64))
    b = n if hadamard(n) is not None else n & -n
    torch.testing.assert_close(h.abs().max(), torch.tensor(b ** -0.5, dtype=torch.float64))
    q, k = torch.randn(3, n, dtype=torch.float64), torch.randn(5, n, dtype=torch.float64)
    torch.testing.assert_close((q @ h) @ (k @ h).T, q @ k.T)


def test_kv_key_rotation_only_for_a_quantized_cache():
    from fastinfer.layers.kv_rotation import key_rotation

    assert key_rotation(torch.empty(2, 4, 1, 64, dtype=torch.bfloat16), 64, torch.bfloat16) is None
    for dt in (torch.int8, torch.uint8):  # int8 and fp8_e4m3 rows (D codes + the fp16 scale)
        r = key_rotation(torch.empty(2, 4, 1, 66, dtype=dt), 64, torch.bfloat16)
        assert r is not None and r.shape == (64, 64) and r.dtype == torch.bfloat16
