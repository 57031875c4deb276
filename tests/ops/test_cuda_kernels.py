"""The CUDA C++ kernels (csrc/cuda/, fastinfer.ops.cuda_backend) against fastinfer.ops.reference, with the inputs of
the Triton and C++ kernel tests: NaN in every cache slot no sequence wrote, shuffled block ids, odd sizes, fp16 and
bf16. Marked ``gpu`` (skipped without a CUDA GPU); on a GPU whose install lacks the CUDA tier they skip saying so
(benchmarks/gpu_check.py builds it first)."""
from __future__ import annotations

import pytest
import torch

from fastinfer.ops import reference
from tests.ops.paged_cases import paged_case

pytestmark = pytest.mark.gpu
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture(scope="module")
def cb():
    from fastinfer.ops.registry import compiled_tiers

    if compiled_tiers()["cuda"] != "built":
        pytest.skip(f"CUDA kernels: {compiled_tiers()['cuda']}")
    from fastinfer.ops import cuda_backend

    return cuda_backend


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(out).all(), "non-finite output (a NaN cache slot leaked?)"
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


def _attention(q, kc, vc, meta, scale, window, softcap) -> torch.Tensor:
    """The CUDA op itself, every row (the backend sends prefill batches to Triton)."""
    out = torch.empty_like(q)
    torch.ops.fastinfer.paged_attention(q, kc, vc, meta.block_table, meta.seq_lens, meta.query_start_loc, scale,
                                        window or 0, out, softcap or 0.0)
    return out


# (query_lens, seq_lens, H, Hkv, D, block_size, window, softcap): decode rows first
ATTENTION_CASES = {
    "decode-mha-d64-bs16": ([1, 1, 1], [1, 17, 300], 4, 4, 64, 16, None, None),
    "decode-gqa4-d128-bs32": ([1, 1, 1, 1], [33, 64, 65, 1000], 16, 4, 128, 32, None, None),
    "decode-gqa8-long": ([1, 1], [5000, 9000], 32, 4, 128, 16, None, None),
    "decode-single-long": ([1], [20000], 32, 8, 128, 16, None, None),
    "decode-group7-d64": ([1, 1, 1], [7, 90, 513], 14, 2, 64, 16, None, None),
    "decode-group16-d128": ([1, 1], [100, 700], 32, 2, 128, 32, None, None),
    "decode-mqa-window": ([1, 1, 1], [40, 600, 2000], 8, 1, 64, 16, 128, None),
    "decode-softcap-window": ([1, 1], [900, 40], 8, 4, 128, 16, 256, 1.5),
    "mixed-prefill-rows": ([1, 1, 37, 64], [300, 1025, 100, 64], 32, 8, 128, 16, None, None),
    "prefill-window": ([1, 90], [700, 200], 8, 2, 64, 32, 50, None),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", ATTENTION_CASES.values(), ids=ATTENTION_CASES.keys())
def test_paged_attention(cb, case, dtype):
    qlens, slens, h, hkv, d, bs, window, softcap = case
    q, kc, vc, meta = paged_case(qlens, slens, h, hkv, d, bs, dtype, device="cuda")
    ref = reference.paged_attention(q.float(), kc.float(), vc.float(), meta, d ** -0.5, window, softcap)
    _close(_attention(q, kc, vc, meta, d ** -0.5, window, softcap), ref, dtype)
    if meta.num_decodes == meta.num_seqs:  # the backend's own path
        _close(cb.paged_attention(q, kc, vc, meta, d ** -0.5, window, softcap), ref, dtype)


def test_paged_attention_strided_q_and_wide_block_table(cb):
    """q as a view of a fused qkv projection, and a block table far wider than the sequences (many empty splits, as
    in a captured decode graph sized for max_model_len)."""
    qlens, slens = [1, 1, 1], [10, 300, 33]
    q, kc, vc, meta = paged_case(qlens, slens, 8, 2, 128, 16, torch.bfloat16, device="cuda")
    fused = torch.randn(3, 12, 128, device="cuda", dtype=torch.bfloat16)
    fused[:, :8] = q
    wide = torch.zeros(3, 512, dtype=torch.int32, device="cuda")
    wide[:, :meta.block_table.shape[1]] = meta.block_table
    ref = reference.paged_attention(q.float(), kc.float(), vc.float(), meta, 0.1, None)
    out = torch.empty_like(q)
    torch.ops.fastinfer.paged_attention(fused[:, :8], kc, vc, wide, meta.seq_lens, meta.query_start_loc, 0.1, 0,
                                        out, 0.0)
    _close(out, ref, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_store_kv(cb, dtype):
    kc = torch.full((6, 16, 2, 64), float("nan"), device="cuda", dtype=dtype)
    vc = kc.clone()
    fused = torch.randn(7, 12, 64, device="cuda", dtype=dtype)  # key / value as views of a fused projection
    key, value = fused[:, 8:10], fused[:, 10:12]
    slots = torch.tensor([0, 5, -1, 17, 95, -1, 40], device="cuda")
    rk, rv = kc.clone(), vc.clone()
    reference.store_kv(key, value, rk, rv, slots)
    cb.store_kv(key, value, kc, vc, slots)
    torch.testing.assert_close(kc, rk, equal_nan=True, atol=0, rtol=0)
    torch.testing.assert_close(vc, rv, equal_nan=True, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("hidden", [64, 1000, 4096])
def test_rms_norms(cb, dtype, hidden):
    wide = torch.randn(5, hidden + 24, device="cuda", dtype=dtype)
    x = wide[:, :hidden]  # strided rows
    res = torch.randn(5, hidden, device="cuda", dtype=dtype)
    w = torch.randn(hidden, device="cuda", dtype=dtype)
    _close(cb.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6), dtype)
    out, s = cb.fused_add_rms_norm(x, res, w, 1e-6)
    rout, rs = reference.fused_add_rms_norm(x, res, w, 1e-6)
    torch.testing.assert_close(s, rs, atol=0, rtol=0)
    _close(out, rout, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("rot", [128, 64], ids=["full", "partial"])
def test_rotary_in_place(cb, dtype, rot):
    qkv = torch.randn(9, 12, 128, device="cuda", dtype=dtype)
    q, k = qkv[:, :8], qkv[:, 8:10]
    positions = torch.tensor([0, 1, 2, 7, 100, 3, 511, 4, 9], device="cuda")
    cache = torch.randn(512, rot, device="cuda")
    rq, rk = reference.rotary_embedding(positions, q.clone(), k.clone(), cache)
    v_before = qkv[:, 10:].clone()
    oq, ok = cb.rotary_embedding(positions, q, k, cache)
    assert oq.data_ptr() == q.data_ptr() and ok.data_ptr() == k.data_ptr()
    torch.testing.assert_close(q, rq, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(k, rk, atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.equal(qkv[:, 10:], v_before)


def _quant_case(bits, n, k, group, scale_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if bits == 4:
        from fastinfer.quantization import pack_int4

        qweight = pack_int4(torch.randint(0, 16, (n, k), generator=g))
        mins = (torch.randn(n, k // group, generator=g) * 0.1).to(scale_dtype)
    else:
        qweight = torch.randint(-127, 128, (n, k), generator=g).to(torch.int8)
        mins = None
    scales = (torch.rand(n, k // group, generator=g) * 0.02 + 0.001).to(scale_dtype)
    return [t if t is None else t.cuda() for t in (qweight, scales, mins)]


QUANT_CASES = {  # (bits, N, K, group, scale dtype, rows of x)
    "int4-g32-m1": (4, 100, 256, 32, torch.float32, 1),
    "int4-g128-m3": (4, 4096, 1024, 128, torch.float32, 3),
    "int4-f16scales-m8": (4, 77, 512, 64, torch.float16, 8),
    "int4-m17-dequant": (4, 300, 512, 128, torch.float32, 17),
    "int8-perchannel-m1": (8, 129, 1024, 1024, torch.float32, 1),
    "int8-g32-m5": (8, 64, 4096, 32, torch.float32, 5),
    "int8-g16-m2-f16": (8, 33, 48, 16, torch.float16, 2),
    "int8-m40-dequant": (8, 256, 256, 256, torch.float32, 40),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", QUANT_CASES.values(), ids=QUANT_CASES.keys())
def test_quant_linear(cb, case, dtype):
    bits, n, k, group, sdt, m = case
    qweight, scales, mins = _quant_case(bits, n, k, group, sdt)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    for b in (None, bias):
        out = cb.quant_linear(x, qweight, scales, mins, bits, group, b)
        ref = reference.quant_linear(x, qweight, scales, mins, bits, group, b)
        assert out.shape == (m, n) and out.dtype == dtype
        scale = ref.float().abs().max().item()
        torch.testing.assert_close(out.float() / scale, ref.float() / scale, atol=TOL[dtype], rtol=0)


def test_opset_picks_the_cuda_kernels(cb):
    from fastinfer.ops.registry import OpSet

    chosen = OpSet(device_type="cuda").chosen
    for op in ("paged_attention", "store_kv", "rms_norm", "fused_add_rms_norm", "rotary_embedding", "quant_linear"):
        assert chosen[op] == "cuda", chosen
