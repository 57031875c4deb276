"""Every Triton kernel against fastinfer.ops.reference. On CPU the kernels run under TRITON_INTERPRET=1 (set by
tests/conftest.py): fp32 and fp16 there, bf16 only on a GPU (the interpreter's bf16 dot is wrong)."""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

from fastinfer.kernels.attention import attention_flops, paged_decode_triton, paged_prefill_triton  # noqa: E402

from fastinfer.ops import AttentionMetadata, reference  # noqa: E402
from fastinfer.ops import triton_backend as tb  # noqa: E402
from tests.ops.paged_cases import paged_case as _paged_case  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(out).all(), "non-finite output (a NaN cache slot leaked?)"
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


def paged_case(*args, **kw):
    return _paged_case(*args, device=DEVICE, **kw)


# (query_lens, seq_lens, H, Hkv, D, block_size, dtype, window): decode rows first
ATTENTION_CASES = {
    "mixed-mha-fp32": ([1, 1, 17], [17, 33, 40], 4, 4, 64, 16, torch.float32, None),
    "mixed-gqa4-d128-fp16": ([1, 33], [1, 33], 8, 2, 128, 8, torch.float16, None),
    "mixed-mqa-bs32-fp32": ([1, 1, 1, 5, 17], [64, 100, 7, 70, 17], 8, 1, 64, 32, torch.float32, None),
    "prefill-ctx-d80-fp16": ([1, 9, 3], [50, 9, 41], 4, 2, 80, 16, torch.float16, None),
    "prefill-d96-gqa4-fp32": ([33, 17], [33, 50], 8, 2, 96, 8, torch.float32, None),
    "window-gqa4-fp16": ([1, 1, 20], [40, 5, 45], 8, 2, 64, 8, torch.float16, 7),
    "window-mha-bs32-fp32": ([1, 33], [90, 66], 2, 2, 64, 32, torch.float32, 16),
    "window-long-fp32": ([1, 40, 70], [150, 160, 200], 4, 2, 64, 16, torch.float32, 70),
    "tiny-d16-gqa2-fp32": ([1, 1, 6], [12, 3, 6], 4, 2, 16, 4, torch.float32, None),
    "group3-fp16": ([1, 11], [29, 30], 6, 2, 64, 16, torch.float16, None),
}


@pytest.mark.parametrize("case", ATTENTION_CASES.values(), ids=ATTENTION_CASES.keys())
def test_paged_attention(case):
    qlens, slens, h, hkv, d, bs, dtype, window = case
    q, kc, vc, meta = paged_case(qlens, slens, h, hkv, d, bs, dtype)
    out = tb.paged_attention(q, kc, vc, meta, d ** -0.5, window)
    _close(out, reference.paged_attention(q, kc, vc, meta, d ** -0.5, window), dtype)


SOFTCAP_CASES = {
    "mixed-gqa4-fp32": ([1, 1, 17], [17, 33, 40], 8, 2, 64, 16, torch.float32, None),
    "window-gqa4-fp16": ([1, 1, 20], [40, 5, 45], 8, 2, 64, 8, torch.float16, 7),
    "prefill-ctx-d80-fp32": ([1, 9, 3], [50, 9, 41], 4, 2, 80, 16, torch.float32, 16),
}


@pytest.mark.parametrize("case", SOFTCAP_CASES.values(), ids=SOFTCAP_CASES.keys())
def test_paged_attention_softcap(case):
    """Attention logit soft-capping (Gemma 2) in the prefill and decode kernels; the cap of 1.5 bends scores of
    size ~1 hard, so a kernel that ignored it would fail."""
    qlens, slens, h, hkv, d, bs, dtype, window = case
    q, kc, vc, meta = paged_case(qlens, slens, h, hkv, d, bs, dtype)
    out = tb.paged_attention(q, kc, vc, meta, d ** -0.5, window, 1.5)
    _close(out, reference.paged_attention(q, kc, vc, meta, d ** -0.5, window, 1.5), dtype)
    assert not torch.allclose(out.float(), tb.paged_attention(q, kc, vc, meta, d ** -0.5, window).float(), atol=0.05)
    nd = meta.num_decodes  # the split-KV decode path with its reduction
    dec = torch.empty_like(q[:nd])
    paged_decode_triton(q[:nd], kc, vc, dec, meta.block_table, meta.seq_lens, max(slens[:nd]), d ** -0.5, window,
                        num_splits=3, softcap=1.5)
    _close(dec, out[:nd], dtype)
    with pytest.raises(ValueError, match="softcap"):
        tb.paged_attention(q, kc, vc, meta, d ** -0.5, window, 0.0)


@pytest.mark.parametrize("seed", range(8))
def test_paged_attention_random_batches(seed):
    """Random mixes: 0-3 decode rows, 0-2 prefill rows with or without earlier context, random shapes,
    windows down to 1 (each query sees only itself)."""
    rng = random.Random(100 + seed)
    h, hkv = rng.choice([(4, 4), (8, 2), (8, 1), (6, 2)])
    d, bs = rng.choice([16, 64, 80, 128]), rng.choice([8, 16, 32])
    dtype, window = rng.choice([torch.float32, torch.float16]), rng.choice([None, None, 1, 9, 40])
    nd, npf = rng.randint(0, 3), rng.randint(0 if seed % 2 else 1, 2)
    qlens = [1] * nd + [rng.randint(2, 40) for _ in range(npf)]
    slens = [rng.randint(1, 120) for _ in range(nd)] + [q + rng.choice([0, rng.randint(1, 60)]) for q in qlens[nd:]]
    q, kc, vc, meta = paged_case(qlens, slens, h, hkv, d, bs, dtype, seed=seed)
    out = tb.paged_attention(q, kc, vc, meta, 0.3, window)
    _close(out, reference.paged_attention(q, kc, vc, meta, 0.3, window), dtype)


@pytest.mark.parametrize("window", [None, 5])
def test_prefill_kernel_handles_decode_rows(window):
    """The varlen kernel alone (no decode routing) on a mixed batch, strided q, GQA 8."""
    q, kc, vc, meta = paged_case([1, 1, 12], [30, 2, 19], 8, 1, 64, 8, torch.float16, seed=1)
    q_wide = torch.randn(q.shape[0], q.shape[1], 2 * q.shape[2], dtype=q.dtype, device=DEVICE)  # [T, H, 2D]
    q_wide[..., :64] = q
    qs = q_wide[..., :64]  # non-contiguous view
    out = torch.empty_like(q)
    paged_prefill_triton(qs, kc, vc, out, meta, 0.1, window)
    _close(out, reference.paged_attention(q, kc, vc, meta, 0.1, window), torch.float16)


@pytest.mark.parametrize("num_splits", [1, 3, 8])
@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("dtype,head_dim,group", [(torch.float32, 64, 4), (torch.float16, 128, 8)])
def test_decode_split_kv(num_splits, window, dtype, head_dim, group):
    """Split-KV on and off; splits that fall past a short sequence are empty and must weigh nothing."""
    slens = [1, 17, 100, 257]
    q, kc, vc, meta = paged_case([1] * 4, slens, 2 * group, 2, head_dim, 16, dtype, seed=2)
    out = torch.empty_like(q)
    paged_decode_triton(q, kc, vc, out, meta.block_table, meta.seq_lens, max(slens), 0.125, window, num_splits)
    _close(out, reference.paged_attention(q, kc, vc, meta, 0.125, window), dtype)


def test_attention_flops_counts_visible_pairs():
    meta = AttentionMetadata.build([1, 3], [5, 3], [[0, 1], [2]], 4)
    assert attention_flops(meta, 2, 8) == 4 * 8 * 2 * (5 + 1 + 2 + 3)
    assert attention_flops(meta, 1, 1, sliding_window=2) == 4 * (2 + 1 + 2 + 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_size,num_kv,head_dim", [(16, 2, 64), (8, 3, 80)])
def test_store_kv(dtype, block_size, num_kv, head_dim):
    t = 17
    qkv = torch.randn(t, 3 * num_kv * head_dim).to(DEVICE, dtype)  # [T, 3 * Hkv * D]: k, v are strided views
    key = qkv[:, :num_kv * head_dim].view(t, num_kv, head_dim)
    value = qkv[:, num_kv * head_dim:2 * num_kv * head_dim].view(t, num_kv, head_dim)
    slots = torch.randperm(6 * block_size)[:t].to(DEVICE)
    slots[[3, 10]] = -1  # padding tokens
    shape = (6, block_size, num_kv, head_dim)
    kc, vc = (torch.full(shape, float("nan"), dtype=dtype, device=DEVICE) for _ in range(2))
    kr, vr = kc.clone(), vc.clone()
    tb.store_kv(key, value, kc, vc, slots)
    reference.store_kv(key, value, kr, vr, slots)
    torch.testing.assert_close(kc, kr, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(vc, vr, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_copy_blocks(dtype):
    kc = torch.randn(9, 8, 2, 80).to(DEVICE, dtype)  # [num_blocks, block_size, Hkv, D]
    vc = torch.randn(9, 8, 2, 80).to(DEVICE, dtype)
    kr, vr = kc.clone(), vc.clone()
    pairs = torch.tensor([[2, 5], [0, 7], [3, 1], [2, 8]], dtype=torch.int64, device=DEVICE)
    tb.copy_blocks(kc, vc, pairs)
    reference.copy_blocks(kr, vr, pairs)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)
    tb.copy_blocks(kc, vc, pairs[:0])  # no pairs: no launch
    assert torch.equal(kc, kr)


NORM_SHAPES = [(1, 64), (17, 96), (3, 5, 80)]


@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm(shape, dtype):
    x = (torch.randn(shape) * 3).to(DEVICE, dtype)
    w = torch.randn(shape[-1]).to(DEVICE, dtype)
    _close(tb.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6), dtype)


def test_rms_norm_fp32_weight_on_fp16_input():
    x = torch.randn(7, 64).to(DEVICE, torch.float16)
    w = torch.randn(64, device=DEVICE)
    out = tb.rms_norm(x, w, 1e-5)
    assert out.dtype == torch.float32
    _close(out, reference.rms_norm(x, w, 1e-5), torch.float16)


@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_add_rms_norm(shape, dtype):
    x, res = (torch.randn(shape).to(DEVICE, dtype) for _ in range(2))
    w = torch.randn(shape[-1]).to(DEVICE, dtype)
    x0, res0 = x.clone(), res.clone()
    out, s = tb.fused_add_rms_norm(x, res, w, 1e-6)
    ref_out, ref_s = reference.fused_add_rms_norm(x, res, w, 1e-6)
    assert torch.equal(s, ref_s)
    _close(out, ref_out, dtype)
    assert torch.equal(x, x0) and torch.equal(res, res0), "inputs must not be modified"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_heads,num_kv,head_dim,rot", [(8, 2, 64, 64), (4, 1, 128, 64), (3, 3, 80, 80)])
def test_rotary_embedding(dtype, num_heads, num_kv, head_dim, rot):
    t, max_pos = 17, 100
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), 1.0 / 10000 ** (torch.arange(0, rot, 2) / rot))
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(DEVICE)  # [max_pos, rot]
    qkv = torch.randn(t, (num_heads + 2 * num_kv) * head_dim).to(DEVICE, dtype)  # q, k as strided views
    q = qkv[:, :num_heads * head_dim].view(t, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim:(num_heads + num_kv) * head_dim].view(t, num_kv, head_dim)
    positions = torch.randint(0, max_pos, (t,), device=DEVICE)
    q_out, k_out = tb.rotary_embedding(positions, q, k, cos_sin)
    q_ref, k_ref = reference.rotary_embedding(positions, q, k, cos_sin)
    _close(q_out, q_ref, dtype)
    _close(k_out, k_ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(17, 2 * 96), (2, 3, 2 * 64), (1, 2 * 1500)])
def test_silu_and_mul(dtype, shape):
    x = (torch.randn(shape) * 4).to(DEVICE, dtype)
    _close(tb.silu_and_mul(x), reference.silu_and_mul(x), dtype)


def test_empty_inputs():
    x = torch.empty(0, 64, device=DEVICE)
    assert tb.rms_norm(x, torch.ones(64, device=DEVICE), 1e-6).shape == (0, 64)
    assert tb.silu_and_mul(torch.empty(0, 8, device=DEVICE)).shape == (0, 4)
    kc = torch.zeros(2, 4, 1, 16, device=DEVICE)
    tb.store_kv(torch.empty(0, 1, 16, device=DEVICE), torch.empty(0, 1, 16, device=DEVICE), kc, kc.clone(),
                torch.empty(0, dtype=torch.int64, device=DEVICE))


# Compiles every kernel for sm_90 (Hopper) with the ptxas bundled in the triton wheel, no GPU needed: catches
# what the interpreter cannot (non-constexpr globals, dot shape rules, shared memory over the H200 limit).
_COMPILE_SCRIPT = r"""
import importlib.util, os, sys
root = sys.argv[1]
spec = importlib.util.spec_from_file_location("fastinfer.kernels", root + "/kernels/__init__.py",
                                              submodule_search_locations=[root + "/kernels"])
mod = importlib.util.module_from_spec(spec); sys.modules["fastinfer.kernels"] = mod; spec.loader.exec_module(mod)
import torch, triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as e:
    print("SKIP", e); sys.exit(77)
from fastinfer.kernels import activation, cache, norm, rotary, attention as A

def build(fn, dtype, consts, ptrs={}, floats=("scale_log2", "softcap_log2", "eps"), warps=4, stages=1):
    consts = {**({"KV_QUANT": 0} if "KV_QUANT" in fn.arg_names else {}), **consts}
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        sig[name] = ptrs.get(name, dtype) if name.endswith("_ptr") else "fp32" if name in floats else "i32"
        if name.endswith("_ptr") or name.startswith("stride"):  # what launch-time specialisation infers
            attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    assert k.metadata.shared <= 232448, (fn.__name__, k.metadata.shared)
    print("OK", fn.__name__, dtype, consts.get("HEAD_DIM", ""), k.metadata.shared, flush=True)

idx = {n: "*i32" for n in ("query_start_loc_ptr", "seq_lens_ptr", "block_table_ptr")}
for dt, tdt, d, g, win in [("*bf16", torch.bfloat16, 128, 4, True), ("*fp16", torch.float16, 80, 2, False),
                           ("*bf16", torch.bfloat16, 256, 8, False), ("*fp32", torch.float32, 64, 1, True)]:
    bm, bn, w, st = A._prefill_config(d, g, tdt, True)
    build(A._prefill_kernel, dt, dict(HEAD_DIM=d, BLOCK_D=A._block_d(d), GROUP=g, TOKENS=bm // g, BLOCK_M=bm,
          BLOCK_N=bn, PAGE=16, USE_WINDOW=win, DOT_PRECISION=A._dot_precision(tdt), SOFTCAP=win), idx, warps=w,
          stages=st)
part = {**idx, "part_acc_ptr": "*fp32", "part_m_ptr": "*fp32", "part_l_ptr": "*fp32"}
for dt, tdt, d, g, split in [("*bf16", torch.bfloat16, 128, 8, True), ("*fp16", torch.float16, 256, 1, False)]:
    bn, w, st = A._decode_config(d, True)
    build(A._decode_kernel, dt, dict(HEAD_DIM=d, BLOCK_D=A._block_d(d), GROUP=g, BLOCK_G=max(16, g), BLOCK_N=bn,
          PAGE=16, USE_WINDOW=False, SPLIT=split, DOT_PRECISION=A._dot_precision(tdt), SOFTCAP=split), part, warps=w,
          stages=st)
build(A._decode_reduce_kernel, "*bf16", dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_S=32), part)
build(cache._store_kv_kernel, "*bf16", dict(NUM_KV=8, HEAD_DIM=128, BLOCK_H=8, BLOCK_D=128, PAGE=16),
      {"slot_ptr": "*i64"})
for kv_quant, cptr in [(1, "*i8"), (2, "*u8")]:  # quantized KV caches: int8, fp8 e4m3 bits
    cache_ptrs = {"k_cache_ptr": cptr, "v_cache_ptr": cptr}
    bm, bn, w, st = A._prefill_config(128, 4, torch.bfloat16, True)
    build(A._prefill_kernel, "*bf16", dict(HEAD_DIM=128, BLOCK_D=128, GROUP=4, TOKENS=bm // 4, BLOCK_M=bm, BLOCK_N=bn,
          PAGE=16, USE_WINDOW=True, DOT_PRECISION="tf32", SOFTCAP=False, KV_QUANT=kv_quant), {**idx, **cache_ptrs},
          warps=w, stages=st)
    bn, w, st = A._decode_config(64, True)
    build(A._decode_kernel, "*fp16", dict(HEAD_DIM=64, BLOCK_D=64, GROUP=3, BLOCK_G=16, BLOCK_N=bn, PAGE=16,
          USE_WINDOW=False, SPLIT=True, DOT_PRECISION="tf32", SOFTCAP=False, KV_QUANT=kv_quant),
          {**part, **cache_ptrs}, warps=w, stages=st)
    build(cache._store_kv_kernel, "*bf16", dict(NUM_KV=8, HEAD_DIM=128, BLOCK_H=8, BLOCK_D=128, PAGE=16,
          KV_QUANT=kv_quant), {"slot_ptr": "*i64", **cache_ptrs})
build(cache._copy_blocks_kernel, "*bf16", dict(BLOCK=4096), {"pairs_ptr": "*i64"})
build(norm._rms_norm_kernel, "*bf16", dict(BLOCK=4096, HAS_RESIDUAL=True), warps=8)
build(rotary._rotary_kernel, "*bf16", dict(HALF=64, HEAD_DIM=128, BLOCK_HQ=32, BLOCK_HK=8, BLOCK_HALF=64,
      BLOCK_REST=0), {"pos_ptr": "*i64", "cs_ptr": "*fp32"})
build(activation._silu_and_mul_kernel, "*bf16", dict(BLOCK=1024))
print("ALL COMPILED")
"""


@pytest.mark.skipif(sys.platform != "linux", reason="the triton wheel ships ptxas for linux")
def test_kernels_compile_for_hopper():
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, str(root)], capture_output=True, text=True,
                          env=env, timeout=300)
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0 and "ALL COMPILED" in proc.stdout, (proc.stdout + proc.stderr)[-4000:]


# ------------------------------------------------------------------------------------- GPU-only (bf16)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(ATTENTION_CASES.values())[:6], ids=list(ATTENTION_CASES)[:6])
def test_paged_attention_bf16(case):
    qlens, slens, h, hkv, d, bs, _, window = case
    q, kc, vc, meta = paged_case(qlens, slens, h, hkv, d, bs, torch.bfloat16)
    out = tb.paged_attention(q, kc, vc, meta, d ** -0.5, window)
    _close(out, reference.paged_attention(q, kc, vc, meta, d ** -0.5, window), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_split_kv_bf16(num_splits):
    q, kc, vc, meta = paged_case([1] * 4, [1, 17, 300, 1025], 32, 8, 128, 16, torch.bfloat16, seed=3)
    out = torch.empty_like(q)
    paged_decode_triton(q, kc, vc, out, meta.block_table, meta.seq_lens, 1025, 0.088, None, num_splits)
    _close(out, reference.paged_attention(q, kc, vc, meta, 0.088), torch.bfloat16)


@pytest.mark.gpu
def test_small_ops_bf16():
    dt = torch.bfloat16
    x, res = (torch.randn(9, 4096, device=DEVICE, dtype=dt) for _ in range(2))
    w = torch.randn(4096, device=DEVICE, dtype=dt)
    _close(tb.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6), dt)
    out, s = tb.fused_add_rms_norm(x, res, w, 1e-6)
    ref_out, ref_s = reference.fused_add_rms_norm(x, res, w, 1e-6)
    _close(out, ref_out, dt)
    _close(s, ref_s, dt)
    _close(tb.silu_and_mul(x), reference.silu_and_mul(x), dt)
    cos_sin = torch.randn(64, 128, device=DEVICE)
    q, k = torch.randn(9, 32, 128, device=DEVICE, dtype=dt), torch.randn(9, 8, 128, device=DEVICE, dtype=dt)
    pos = torch.randint(0, 64, (9,), device=DEVICE)
    for a, b in zip(tb.rotary_embedding(pos, q, k, cos_sin), reference.rotary_embedding(pos, q, k, cos_sin)):
        _close(a, b, dt)
