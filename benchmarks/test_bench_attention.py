"""pytest-benchmark: the Triton paged attention kernels vs torch SDPA on a contiguous cache, GPU only.

    pytest benchmarks/test_bench_attention.py --benchmark-group-by=param:case

Shapes are Llama-3-8B-like (H=32, Hkv=8, D=128, bf16, block 16). Skipped without a CUDA GPU.
"""
from __future__ import annotations

import random

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("GPU benchmark: needs CUDA", allow_module_level=True)
pytest.importorskip("triton")
pytest.importorskip("pytest_benchmark")

import torch.nn.functional as F  # noqa: E402

from fastinfer.ops import AttentionMetadata  # noqa: E402
from fastinfer.ops import triton_backend as tb  # noqa: E402

H, HKV, D, BS, DT = 32, 8, 128, 16, torch.bfloat16


def _paged(query_lens: list[int], seq_lens: list[int]):
    need = [-(-s // BS) for s in seq_lens]
    ids = list(range(sum(need)))
    random.Random(0).shuffle(ids)
    blocks = [ids[sum(need[:i]):sum(need[:i + 1])] for i in range(len(need))]
    kc = torch.randn(len(ids), BS, HKV, D, dtype=DT, device="cuda")  # [num_blocks, block, Hkv, D]
    vc = torch.randn_like(kc)
    q = torch.randn(sum(query_lens), H, D, dtype=DT, device="cuda")  # [T, H, D]
    return q, kc, vc, AttentionMetadata.build(query_lens, seq_lens, blocks, BS, "cuda")


def _run(benchmark, fn):
    def call():
        fn()
        torch.cuda.synchronize()

    call()
    benchmark.pedantic(call, rounds=20, warmup_rounds=3)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "sdpa"])
@pytest.mark.parametrize("batch,ctx", [(1, 8192), (16, 2048), (64, 4096)])
def test_decode(benchmark, impl, batch, ctx):
    if impl == "triton":
        q, kc, vc, meta = _paged([1] * batch, [ctx] * batch)
        _run(benchmark, lambda: tb.paged_attention(q, kc, vc, meta, D ** -0.5))
    else:
        q = torch.randn(batch, H, 1, D, dtype=DT, device="cuda")  # [B, H, 1, D]
        k = torch.randn(batch, HKV, ctx, D, dtype=DT, device="cuda")  # [B, Hkv, L, D]
        v = torch.randn_like(k)
        _run(benchmark, lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "sdpa"])
@pytest.mark.parametrize("batch,length", [(1, 2048), (1, 8192), (4, 4096)])
def test_prefill(benchmark, impl, batch, length):
    if impl == "triton":
        q, kc, vc, meta = _paged([length] * batch, [length] * batch)
        _run(benchmark, lambda: tb.paged_attention(q, kc, vc, meta, D ** -0.5))
    else:
        q = torch.randn(batch, H, length, D, dtype=DT, device="cuda")  # [B, H, L, D]
        k = torch.randn(batch, HKV, length, D, dtype=DT, device="cuda")
        v = torch.randn_like(k)
        _run(benchmark, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
