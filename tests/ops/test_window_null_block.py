"""Sliding-window KV groups free the blocks wholly before a sequence's window and point their table entries at a
null block. Every attention backend must skip those blocks, not read-and-mask them: with the null block (and the
freed blocks) full of NaN, outputs equal the reference computed on the intact cache."""
from __future__ import annotations

import importlib
import os

import pytest
import torch

from fastinfer.ops import AttentionMetadata, reference
from tests.ops.paged_cases import paged_case


def _backend(name: str):
    if name == "triton":
        pytest.importorskip("triton")
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1")
    try:
        return importlib.import_module(f"fastinfer.ops.{name}_backend")
    except ImportError as e:
        pytest.skip(f"{name} backend unavailable: {e}")


# (query_lens, seq_lens, block_size, window): decode rows first; chunks whose first query's window starts
# mid-block or exactly on a block edge, and a chunk several windows long after a context of its own
CASES = {
    "decode+chunks-w13-bs4": ([1, 1, 7, 9], [40, 13, 53, 30], 4, 13),
    "edges-w16-bs8": ([1, 1, 5, 16], [17, 16, 37, 48], 8, 16),
    "long-chunk-w24-bs4": ([1, 70], [99, 100], 4, 24),
}


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize(("case", "dtype", "softcap"), [(c, torch.float32, None) for c in CASES]
                         + [("decode+chunks-w13-bs4", torch.float16, None), ("edges-w16-bs8", torch.float32, 1.5)],
                         ids=[f"{c}-fp32" for c in CASES] + ["decode+chunks-w13-bs4-fp16", "edges-w16-bs8-softcap"])
def test_out_of_window_blocks_are_never_read(backend, case, dtype, softcap):
    be = _backend(backend)
    query_lens, seq_lens, bs, window = CASES[case]
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    q, k_cache, v_cache, meta = paged_case(query_lens, seq_lens, 4, 2, 32, bs, dtype, seed=3, device=device)
    scale = 32 ** -0.5
    ref = reference.paged_attention(q.float(), k_cache.float(), v_cache.float(), meta, scale, window, softcap)

    null = k_cache.shape[0]  # one block past the pool, as the KV manager's null block
    nan_block = torch.full((1, *k_cache.shape[1:]), float("nan"), dtype=dtype, device=device)
    k_cache, v_cache = torch.cat([k_cache, nan_block]), torch.cat([v_cache, nan_block])
    tables, freed = [], 0
    for i, (qlen, slen) in enumerate(zip(query_lens, seq_lens)):
        blocks = meta.block_table[i, :-(-slen // bs)].tolist()
        first = max(0, slen - qlen - window + 1) // bs  # blocks wholly before the first query's window
        for b in blocks[:first]:  # the freed blocks may be reused by anyone: poison them as well
            k_cache[b] = v_cache[b] = float("nan")
        tables.append([null] * first + blocks[first:])
        freed += first
    assert freed >= 3, "the case must free blocks"
    null_meta = AttentionMetadata.build(query_lens, seq_lens, tables, bs, device)
    out = be.paged_attention(q, k_cache, v_cache, null_meta, scale, window, softcap)
    assert torch.isfinite(out).all(), f"{backend}: a NaN from an out-of-window block leaked"
    tol = 1e-4 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(out.float().cpu(), ref.cpu(), atol=tol, rtol=tol)
