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

The model describes its residual stream with :meth:`CausalLM.rotation_plan` (embedding, pre-norm blocks with the
projections that read and write the stream, value-head layout, final norm, lm_head); nothing here depends on
a model family.

``Q`` and ``R`` are random Hadamard matrices (a Hadamard matrix with random column signs) when the size has a
Sylvester/Paley construction (2^a x {1, 12, 144}), else random orthogonal matrices from a QR factorization.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fastinfer.models.interface import CausalLM

if TYPE_CHECKING:
    from fastinfer.layers.linear import Linear


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


def rotate_model(model: CausalLM, seed: int = 0) -> str:
    """Rotate ``model`` in place (see the module docstring); returns a short description for the saved config.
    Must run before quantization (every projection still dense)."""
    if any(m.quantized for m in model.quantizable_layers().values()):
        raise ValueError("rotate_model needs a float model: rotate first, then quantize")
    plan = model.rotation_plan()
    head = plan.lm_head()  # untied (a copy of the embedding) before the embedding is rotated
    d = plan.embedding.shape[1]
    head_dims = {b.values.head_dim for b in plan.blocks if b.values is not None}
    if len(head_dims) > 1:
        raise ValueError(f"rotate_model needs one head size, the model has {sorted(head_dims)}")
    g = torch.Generator().manual_seed(seed)
    Q = random_orthogonal(d, g)  # [d, d]
    hd = head_dims.pop() if head_dims else None
    R = random_orthogonal(hd, g) if hd is not None else None  # [hd, hd]
    dt = plan.embedding.dtype

    def weight(lin: Linear) -> torch.Tensor:
        assert lin.weight is not None, "rotate_model needs dense projections"
        return lin.weight.data.double()

    def set_(p: torch.Tensor, value: torch.Tensor) -> None:
        p.data = value.to(dt).contiguous()

    assert head.weight is not None
    set_(head.weight, (weight(head) * plan.final_norm.data.double()) @ Q)
    set_(plan.embedding, plan.embedding.data.double() @ Q)
    plan.final_norm.data.fill_(1.0)
    for block in plan.blocks:
        norm = block.norm.data.double()
        rotated: dict[Linear, torch.Tensor] = {}
        for lin in block.readers:  # W diag(norm) Q
            rotated[lin] = (weight(lin) * norm) @ Q
        v = block.values
        if v is not None:
            assert R is not None
            w = rotated.get(v.producer, weight(v.producer))
            rows = slice(v.start, v.start + v.num_kv_heads * v.head_dim)
            w[rows] = torch.einsum("ji,hjk->hik", R, w[rows].view(v.num_kv_heads, v.head_dim, -1)).reshape(
                v.num_kv_heads * v.head_dim, -1)  # R^T W_v per head
            rotated[v.producer] = w
            if v.producer.bias is not None:
                b = v.producer.bias.data.double()
                b[rows] = (b[rows].view(v.num_kv_heads, v.head_dim) @ R).reshape(-1)
                set_(v.producer.bias, b)
            wo = weight(v.consumer)
            rotated[v.consumer] = (wo.view(wo.shape[0], v.num_heads, v.head_dim) @ R).reshape(wo.shape)  # W_o R
        for lin in block.writers:  # Q^T W (and Q^T b)
            rotated[lin] = Q.T @ rotated.get(lin, weight(lin))
            if lin.bias is not None:
                set_(lin.bias, Q.T @ lin.bias.data.double())
        for lin, w in rotated.items():
            assert lin.weight is not None
            set_(lin.weight, w)
        block.norm.data.fill_(1.0)
    kind = "hadamard" if hadamard(d) is not None else "orthogonal"
    return f"residual {kind} {d}x{d} and per-head value rotation {hd}x{hd}, seed {seed}"
