"""The compiled CPU kernels (fastinfer._C via fastinfer.ops.cpp_backend) against fastinfer.ops.reference.

Caches are poisoned with NaN in every slot no sequence has written (positions >= seq_len), block ids are
shuffled (non-contiguous), and every instruction-set variant the CPU supports is exercised."""
from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("fastinfer._C", reason="compiled extension not built (pip install -e . --no-build-isolation)")

from fastinfer.ops import AttentionMetadata, reference  # noqa: E402
from fastinfer.ops import cpp_backend as cpp  # noqa: E402
from fastinfer.ops.registry import OpSet, backend_status  # noqa: E402
from tests.ops.paged_cases import paged_case  # noqa: E402


def check(q, k_cache, v_cache, meta, window, kernel_meta=None, softcap=None):
    """Kernel output vs the reference computed in fp32 from the same (possibly bf16/fp16) inputs: fp32 must
    agree to ~1e-5, lower precisions to about one rounding of the output."""
    scale = q.shape[-1] ** -0.5
    out = cpp.paged_attention(q, k_cache, v_cache, kernel_meta or meta, scale, window, softcap)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all(), "non-finite output: a NaN slot leaked"
    ref = reference.paged_attention(q.float(), k_cache.float(), v_cache.float(), meta, scale, window, softcap)
    tol = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-3, 8e-3), torch.float16: (5e-4, 1e-3)}[q.dtype]
    torch.testing.assert_close(out.float(), ref, atol=tol[0], rtol=tol[1])
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (8, 1)], ids=["mha", "gqa4", "gqa8"])
@pytest.mark.parametrize("window", [None, 16], ids=["full", "window16"])
def test_decode(heads, block_size, head_dim, dtype, window):
    seq_lens = [1, 17, 33, 100, 129]
    check(*paged_case([1] * len(seq_lens), seq_lens, *heads, head_dim, block_size, dtype), window)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (8, 1)], ids=["mha", "gqa4", "gqa8"])
@pytest.mark.parametrize("window", [None, 7, 40], ids=["full", "window7", "window40"])
def test_mixed_decode_and_prefill(heads, block_size, head_dim, dtype, window):
    # decode rows first; then a fresh prompt, chunks with prior context (query_len < seq_len), a long chunk
    query_lens = [1, 1, 1, 33, 5, 17, 70]
    seq_lens = [1, 50, 129, 33, 40, 100, 300]
    check(*paged_case(query_lens, seq_lens, *heads, head_dim, block_size, dtype, seed=1), window)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_every_isa(isa, threads, dtype):
    query_lens = [1, 1, 1, 12, 40]
    seq_lens = [3, 700, 2100, 12, 1000]  # the long rows get split into parts when threads > 1
    for window, softcap in ((None, None), (300, None), (300, 2.0)):
        check(*paged_case(query_lens, seq_lens, 12, 3, 64, 16, dtype, seed=2), window, softcap=softcap)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("heads", [(8, 2), (8, 1)], ids=["gqa4", "gqa8"])
@pytest.mark.parametrize("window", [None, 7], ids=["full", "window7"])
def test_softcap(isa, heads, dtype, window):
    """Attention logit soft-capping (Gemma 2) on decode rows (scores from the cache rows) and prefill chunks
    (transposed keys), in every instruction-set variant; scores of size ~1 against a cap of 1.5 bend hard."""
    case = paged_case([1, 1, 9, 20], [1, 40, 30, 20], *heads, 64, 16, dtype, seed=9)
    capped = check(*case, window, softcap=1.5)
    assert not torch.allclose(capped.float(), cpp.paged_attention(*case, 0.125, window).float(), atol=0.05)
    with pytest.raises(ValueError, match="softcap"):
        cpp.paged_attention(*case, 0.125, window, 0.0)


@pytest.mark.parametrize("head_dim", [16, 80, 96, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_head_dims(head_dim, dtype, threads):
    check(*paged_case([1, 1, 9], [5, 300, 60], 6, 2, head_dim, 16, dtype, seed=3), None)


@pytest.mark.parametrize("block_size", [1, 5, 48])
def test_odd_block_sizes(block_size):
    check(*paged_case([1, 1, 6], [1, 70, 53], 4, 2, 64, block_size, torch.bfloat16, seed=8), None)
    check(*paged_case([1, 1, 6], [1, 70, 53], 4, 2, 64, block_size, torch.float32, seed=8), 9)


def test_long_context_split(threads):
    q, k, v, meta = paged_case([1, 1], [5000, 37], 8, 2, 64, 16, torch.bfloat16, seed=4)
    check(q, k, v, meta, None)
    check(q, k, v, meta, 1000)


def test_many_query_heads_per_kv_head():
    # MQA with 32 query heads on one KV head: more queries per item than one tile
    check(*paged_case([1, 1, 20], [40, 90, 64], 32, 1, 64, 16, torch.bfloat16, seed=5), None)
    check(*paged_case([1, 1, 20], [40, 90, 64], 32, 1, 64, 16, torch.float32, seed=5), None)


def test_strided_q_and_zero_rows():
    q, k, v, meta = paged_case([1, 3], [20, 30], 4, 2, 64, 16, torch.float32, seed=6)
    wide = torch.randn(q.shape[0], 6, 64)
    wide[:, :4] = q
    check(wide[:, :4], k, v, meta, None)  # token stride 6 * 64: no copy needed
    assert cpp.paged_attention(q[:0], k, v, AttentionMetadata.build([], [], [], 16), 0.125).shape == (0, 4, 64)


def test_window_never_reads_blocks_before_it():
    # blocks wholly before the window may already be freed: poison their table entries
    q, k, v, meta = paged_case([1, 4], [200, 100], 4, 2, 64, 16, torch.float32, seed=7)
    window = 40
    table = meta.block_table.clone()
    table[0, :(200 - window) // 16] = 10 ** 6
    table[1, :(100 - 4 - window + 1) // 16] = -5
    check(q, k, v, meta, window, kernel_meta=dataclasses.replace(meta, block_table=table))
    with pytest.raises(RuntimeError, match="block id"):
        cpp.paged_attention(q, k, v, dataclasses.replace(meta, block_table=table), 0.125, None)


def test_bad_metadata_raises():
    q, k, v, meta = paged_case([1, 3], [20, 30], 4, 2, 64, 16, torch.float32)
    with pytest.raises(RuntimeError, match="seq_len"):
        cpp.paged_attention(q, k, v, dataclasses.replace(meta, seq_lens=torch.tensor([20, 2], dtype=torch.int32)),
                            0.125)
    with pytest.raises(RuntimeError, match="block_table"):
        cpp.paged_attention(q, k, v, dataclasses.replace(meta, seq_lens=torch.tensor([20, 300], dtype=torch.int32)),
                            0.125)
    with pytest.raises(RuntimeError, match="int32|Int"):
        cpp.paged_attention(q, k, v, dataclasses.replace(meta, block_table=meta.block_table.long()), 0.125)


def test_unsupported_head_dim_falls_back_to_torch(caplog):
    q, k, v, meta = paged_case([1, 2], [9, 20], 4, 2, 72, 8, torch.float32)
    with caplog.at_level("WARNING", logger="fastinfer.ops"):
        check(q, k, v, meta, None)
    assert "head_dim 72" in caplog.text


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_store_kv(dtype):
    gen = torch.Generator().manual_seed(0)
    num_blocks, block_size, num_kv, head_dim, t = 7, 16, 2, 64, 40
    fused = torch.randn(t, 3 * num_kv * head_dim, generator=gen).to(dtype)  # key/value as strided views
    key = fused[:, :num_kv * head_dim].view(t, num_kv, head_dim)
    value = fused[:, 2 * num_kv * head_dim:].view(t, num_kv, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:t]
    slots[::7] = -1  # padding
    k_cache = torch.randn(num_blocks, block_size, num_kv, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv, head_dim, generator=gen).to(dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    reference.store_kv(key, value, k_ref, v_ref, slots)
    cpp.store_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    # the other dtype is converted, as in the torch backend
    cpp.store_kv(key.float(), value.float(), k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref)
    with pytest.raises(RuntimeError, match="slot"):
        cpp.store_kv(key, value, k_cache, v_cache, torch.full((t,), num_blocks * block_size))


def test_fake_kernels_trace():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v, meta = paged_case([1, 3], [20, 30], 4, 2, 64, 16, torch.float32)
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = torch.empty_like(q)
        torch.ops.fastinfer.paged_attention(q, k, v, meta.block_table, meta.seq_lens, meta.query_start_loc,
                                            0.125, 0, out)
        assert out.shape == q.shape


def test_registry_picks_cpp_on_cpu():
    ops = OpSet("cpu", prefer="cpp")
    assert ops.chosen["paged_attention"] == "cpp" and ops.chosen["store_kv"] == "cpp"
    mod, why = backend_status("cpp", "cuda")
    assert mod is None and "CPU" in why
    assert backend_status("cpp", "cpu")[0] is cpp
