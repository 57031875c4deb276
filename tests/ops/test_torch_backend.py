"""The plain-torch backend against fastinfer.ops.reference on real CPU tensors (its fake-tensor tracing is in
test_fake_tensor.py), and AttentionMetadata.build against the per-token definition of the slot mapping."""
from __future__ import annotations

import random

import pytest
import torch

from fastinfer.ops import AttentionMetadata, reference
from fastinfer.ops import torch_backend as tb
from tests.ops.paged_cases import paged_case


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window", [None, 4], ids=["full", "window4"])
@pytest.mark.parametrize("softcap", [None, 1.5], ids=["nocap", "softcap"])
def test_paged_attention(dtype, window, softcap):
    # two decodes, a chunked prefill, an empty row, a full prefill
    q, kc, vc, meta = paged_case([1, 1, 4, 0, 6], [20, 7, 30, 3, 6], 4, 2, 32, 4, dtype)
    out = tb.paged_attention(q, kc, vc, meta, 0.2, window, softcap)
    ref = reference.paged_attention(q, kc, vc, meta, 0.2, window, softcap)
    assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    if softcap is not None:  # the cap is active at these score sizes
        assert not torch.allclose(out, tb.paged_attention(q, kc, vc, meta, 0.2, window), atol=10 * tol)
    single = paged_case([5], [5], 4, 2, 32, 4, dtype)  # one prefill: the output is still contiguous
    assert tb.paged_attention(*single, 0.2).is_contiguous()


@pytest.mark.parametrize("padding", ["none", "some", "all"])
def test_store_kv_skips_padding_without_a_host_read(padding):
    gen = torch.Generator().manual_seed(0)
    t = 12
    k_cache, v_cache = torch.randn(5, 4, 2, 8, generator=gen), torch.randn(5, 4, 2, 8, generator=gen)
    fused = torch.randn(t, 3, 2, 8, generator=gen)  # key and value as strided views
    key, value = fused[:, 0], fused[:, 2]
    slots = torch.randperm(20, generator=gen)[:t]
    if padding == "some":
        slots[[0, 3, 4, 11]] = -1  # a padding token first: it must not take slot 0
    elif padding == "all":
        slots[:] = -1
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    reference.store_kv(key, value, k_ref, v_ref, slots)
    tb.store_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    tb.store_kv(key.double()[:0], value.double()[:0], k_cache, v_cache, slots[:0])  # no tokens
    tb.store_kv(key.double(), value.double(), k_cache, v_cache, slots.int())  # dtypes converted
    assert torch.equal(k_cache, k_ref)


def test_small_ops_are_the_reference():
    gen = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 50, (7,), generator=gen)
    q, k, cs = torch.randn(7, 4, 16, generator=gen), torch.randn(7, 2, 16, generator=gen), torch.randn(50, 12)
    for a, b in zip(tb.rotary_embedding(pos, q, k, cs), reference.rotary_embedding(pos, q, k, cs)):
        assert torch.equal(a, b)
    x = torch.randn(3, 5, 16, generator=gen).bfloat16()
    assert torch.equal(tb.silu_and_mul(x), reference.silu_and_mul(x))
    kc, vc = torch.randn(9, 4, 2, 8, generator=gen), torch.randn(9, 4, 2, 8, generator=gen)
    kr, vr = kc.clone(), vc.clone()
    pairs = torch.tensor([[2, 5], [0, 7], [3, 1]])
    tb.copy_blocks(kc, vc, pairs)
    reference.copy_blocks(kr, vr, pairs)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)


def _per_token(query_lens, seq_lens, block_ids, block_size):
    """The definition: one slot per new token, in a Python loop."""
    return [blocks[p // block_size] * block_size + p % block_size
            for q, s, blocks in zip(query_lens, seq_lens, block_ids) for p in range(s - q, s)]


@pytest.mark.parametrize("small", [0, 10**9], ids=["numpy", "lists"])  # both builders: large and small steps
def test_metadata_build_matches_the_per_token_definition(small, monkeypatch):
    monkeypatch.setattr(AttentionMetadata, "SMALL_BATCH_TOKENS", small)
    rng = random.Random(0)
    for _ in range(200):
        bs = rng.choice([1, 4, 16])
        seq_lens = [rng.randint(0, 50) for _ in range(rng.randint(0, 6))]
        query_lens = [rng.choice([1, rng.randint(0, s)]) if s else 0 for s in seq_lens]
        blocks = [[rng.randint(0, 999) for _ in range(-(-s // bs) + rng.randint(0, 2))] for s in seq_lens]
        ids = [rng.randint(0, 9999) for _ in range(sum(query_lens))]
        meta = AttentionMetadata.build(query_lens, seq_lens, blocks, bs, input_ids=ids)
        assert meta.slot_mapping.dtype == torch.int64
        assert meta.slot_mapping.tolist() == _per_token(query_lens, seq_lens, blocks, bs)
        assert meta.input_ids is not None and meta.input_ids.tolist() == ids
        assert meta.positions is not None and meta.positions.tolist() == [
            p for q, s in zip(query_lens, seq_lens) for p in range(s - q, s)]
        width = max((len(b) for b in blocks), default=1)
        assert meta.block_table.dtype == torch.int32 and meta.block_table.shape == (len(blocks), width)
        assert meta.block_table.tolist() == [b + [0] * (width - len(b)) for b in blocks]
        assert meta.seq_lens.tolist() == seq_lens and meta.seq_lens.dtype == torch.int32
        qsl = [0]
        for q in query_lens:
            qsl.append(qsl[-1] + q)
        assert meta.query_start_loc.tolist() == qsl
        nd = next((i for i, q in enumerate(query_lens) if q != 1), len(query_lens))
        assert meta.num_decodes == nd


@pytest.mark.parametrize("small", [0, 10**9], ids=["numpy", "lists"])
def test_metadata_build_rejects_bad_lists(small, monkeypatch):
    monkeypatch.setattr(AttentionMetadata, "SMALL_BATCH_TOKENS", small)
    with pytest.raises(ValueError, match="query_len <= seq_len"):
        AttentionMetadata.build([5], [3], [[0]], 4)
    with pytest.raises(ValueError, match="block lists"):
        AttentionMetadata.build([1, 1], [3, 3], [[0]], 4)
