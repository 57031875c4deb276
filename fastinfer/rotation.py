"""Rotating a model's hidden spaces before quantization (incoherence processing, as in QuIP# / QuaRot).

Weights whose rows and columns are mixed by a random orthogonal matrix lose their outliers and their structure
(SmolLM2's float weights, for instance, are themselves a 4-bit g32 grid), which makes GPTQ's job easier. The
rotations cancel exactly, so the rotated model computes the same function and keeps the same architecture:

- the residual stream is multiplied by ``Q`` [hidden, hidden]: the embedding becomes ``E Q``, every projection
  that reads the stream ``W Q`` (after the RMSNorm weight is folded into it, since RMSNorm without a weight
  commutes with rotations), every projection that writes it ``Q^T W``, and the lm_head ``(E diag(norm)) Q``,
  so tied embeddings are untied;
- each attention head's value space is multiplied by ``R`` [head_dim, head_dim]: ``v_proj`` rows ``R^T W_v``
  (and bias), ``o_proj`` columns ``W_o R``; attention mixes values linearly, so this cancels per head.

``Q`` and ``R`` are random Hadamard matrices (a Hadamard matrix with random column signs) when the size has a
Sylvester/Paley construction (2^a x {1, 12, 144}), else random orthogonal matrices from a QR factorization.
"""
from __future__ import annotations

import dataclasses

import torch

from fastinfer.layers.linear import Linear
from fastinfer.models.llama import LlamaDecoderLayer, LlamaForCausalLM


def _paley12() -> torch.Tensor:
    """The 12 x 12 Hadamard matrix of Paley's first construction (q = 11)."""
    q = 11
    residues = {(i * i) % q for i in range(1, q)}

    def chi(a: int) -> int:
        return 0 if a % q == 0 else (1 if a % q in residues else -1)

    h = torch.zeros(12, 12, dtype=torch.float64)
    h[0, 1:], h[1:, 0] = 1.0, -1.0
    h[1:, 1:] = torch.tensor([[chi(j - i) for j in range(q)] for i in range(q)], dtype=torch.float64)
    return h + torch.eye(12, dtype=torch.float64)


def hadamard(n: int) -> torch.Tensor | None:
    """Orthonormal Hadamard matrix [n, n] (fp64) for n = 2^a * 12^b (b <= 2), else None."""
    h = torch.ones(1, 1, dtype=torch.float64)
    m = n
    for _ in range(2):
        if m % 12 == 0:
            h, m = torch.kron(h, _paley12()), m // 12
    if m < 1 or m & (m - 1):
        return None
    while m > 1:
        h, m = torch.kron(h, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)), m // 2
    return h / n ** 0.5


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """[n, n] fp64 orthogonal: a Hadamard matrix with random column signs, or QR of a Gaussian matrix."""
    h = hadamard(n)
    if h is None:
        q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))
    signs = torch.randint(0, 2, (n,), generator=generator).double() * 2 - 1
    return h * signs


def rotate_model(model: LlamaForCausalLM, seed: int = 0) -> str:
    """Rotate ``model`` in place (see the module docstring); returns a short description for the saved config.
    Must run before quantization (every projection still dense)."""
    cfg = model.config
    linears = model.linear_layers()
    if any(m.quantized for m in linears.values()):
        raise ValueError("rotate_model needs a float model: rotate first, then quantize")
    g = torch.Generator().manual_seed(seed)
    d, hd = cfg.hidden_size, cfg.head_dim
    Q = random_orthogonal(d, g)  # [d, d]
    R = random_orthogonal(hd, g)  # [hd, hd]
    dt = model.embed_tokens.weight.dtype

    def set_(p: torch.Tensor, value: torch.Tensor) -> None:
        p.data = value.to(dt).contiguous()

    E = model.embed_tokens.weight.data.double()  # [V, d]
    head = E if model.lm_head is None else model.lm_head.weight.data.double()  # type: ignore[union-attr]
    head = head * model.norm.weight.data.double()
    if model.lm_head is None:
        model.lm_head = Linear(d, cfg.vocab_size, dtype=dt, ops=model.ops)
        model.config = dataclasses.replace(cfg, tie_word_embeddings=False)
    assert model.lm_head.weight is not None
    set_(model.lm_head.weight, head @ Q)
    set_(model.embed_tokens.weight, E @ Q)
    model.norm.weight.data.fill_(1.0)
    nq, nkv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    for layer in model.layers:
        assert isinstance(layer, LlamaDecoderLayer)
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.qkv_proj.weight is not None and attn.o_proj.weight is not None
        assert mlp.gate_up_proj.weight is not None and mlp.down_proj.weight is not None
        w = (attn.qkv_proj.weight.data.double() * layer.input_layernorm.weight.data.double()) @ Q  # [nq+2nkv, d]
        v = w[nq + nkv:].view(cfg.num_key_value_heads, hd, d)
        w[nq + nkv:] = torch.einsum("ji,hjk->hik", R, v).reshape(nkv, d)  # R^T W_v per head
        set_(attn.qkv_proj.weight, w)
        if attn.qkv_proj.bias is not None:
            b = attn.qkv_proj.bias.data.double()
            b[nq + nkv:] = (b[nq + nkv:].view(cfg.num_key_value_heads, hd) @ R).reshape(nkv)
            set_(attn.qkv_proj.bias, b)
        wo = (attn.o_proj.weight.data.double().view(d, cfg.num_attention_heads, hd) @ R).reshape(d, nq)
        set_(attn.o_proj.weight, Q.T @ wo)
        w = (mlp.gate_up_proj.weight.data.double() * layer.post_attention_layernorm.weight.data.double()) @ Q
        set_(mlp.gate_up_proj.weight, w)
        set_(mlp.down_proj.weight, Q.T @ mlp.down_proj.weight.data.double())
        layer.input_layernorm.weight.data.fill_(1.0)
        layer.post_attention_layernorm.weight.data.fill_(1.0)
    kind = "hadamard" if hadamard(d) is not None else "orthogonal"
    return f"residual {kind} {d}x{d} and per-head value rotation {hd}x{hd}, seed {seed}"
