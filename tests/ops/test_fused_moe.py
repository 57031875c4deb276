"""``fused_moe`` (routed SwiGLU experts) on every backend against ``ops.reference.fused_moe``, and the reference
against a direct per-token formula (so the spec itself can fail). Sizes: odd token counts, 4 to 64 experts,
top-k 1, 2 and 8, hidden / intermediate sizes that are no multiple of a kernel block, experts that get no tokens
(``skewed`` routing sends every token to the even experts only), fp32 / bf16 / fp16, int32 and int64 ids."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastinfer.ops import reference, torch_backend
from tests.ops.conftest import SUPPORTED_ISAS

HIDDEN, INTER = 72, 40
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}
CASES = [(t, e, k) for t in (1, 7, 33, 100) for e in (4, 8, 64) for k in (1, 2, 8) if k <= e]


def moe_case(t: int, e: int, k: int, dtype: torch.dtype, routing: str = "random", ids_dtype=torch.int64,
             seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(x, w13, w2, topk_weights, topk_ids): unit-scale activations, softmax-over-top-k weights, distinct ids
    per token; ``skewed`` routes only to even experts (odd ones get no tokens) when k allows it."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, HIDDEN, generator=gen).to(dtype)
    w13 = (torch.randn(e, 2 * INTER, HIDDEN, generator=gen) / HIDDEN ** 0.5).to(dtype)
    w2 = (torch.randn(e, HIDDEN, INTER, generator=gen) / INTER ** 0.5).to(dtype)
    scores = torch.randn(t, e, generator=gen)
    if routing == "skewed" and k <= e // 2:
        scores[:, 1::2] = -1e9
    vals, ids = scores.topk(k, dim=1)
    return x, w13, w2, vals.softmax(dim=1), ids.to(ids_dtype)


def per_token(x, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    """The contract written token by token, slot by slot (float64 sums, activation rounded to x's dtype)."""
    inter = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            g = w13[e, :inter].double() @ x[t].double()
            u = w13[e, inter:].double() @ x[t].double()
            act = (F.silu(g) * u).to(x.dtype).double()
            out[t] += float(topk_weights[t, j]) * (w2[e].double() @ act)
    return out.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("t,e,k", [(1, 4, 2), (7, 8, 2), (33, 64, 8), (100, 8, 1)])
def test_reference_matches_per_token_formula(t, e, k, dtype):
    case = moe_case(t, e, k, dtype, routing="skewed")
    out = reference.fused_moe(*case)
    assert out.shape == (t, HIDDEN) and out.dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, per_token(*case), atol=atol, rtol=rtol)


@pytest.mark.parametrize("routing", ["random", "skewed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("t,e,k", CASES)
def test_torch_backend_matches_reference(t, e, k, dtype, routing):
    ids_dtype = torch.int32 if (t + e) % 2 else torch.int64
    case = moe_case(t, e, k, dtype, routing, ids_dtype, seed=t * 100 + e + k)
    out = torch_backend.fused_moe(*case)
    assert out.shape == (t, HIDDEN) and out.dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, reference.fused_moe(*case), atol=atol, rtol=rtol)


@pytest.mark.parametrize("t", [2, 33])  # the gathered and the dense form
def test_torch_backend_never_reads_unchosen_experts_into_the_output(t):
    """NaN weights in experts no token chose (routing: even experts only) leave the output finite and equal."""
    x, w13, w2, wts, ids = moe_case(t, 8, 2, torch.float32, routing="skewed")
    w13, w2 = w13.clone(), w2.clone()
    w13[1::2], w2[1::2] = float("nan"), float("nan")
    out = torch_backend.fused_moe(x, w13, w2, wts, ids)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference.fused_moe(x, w13, w2, wts, ids), atol=1e-5, rtol=1e-5)


def test_routing_matters():
    """Proves the comparison can fail: other ids or other weights give other outputs."""
    x, w13, w2, wts, ids = moe_case(7, 8, 2, torch.float32)
    base = reference.fused_moe(x, w13, w2, wts, ids)
    assert not torch.allclose(base, reference.fused_moe(x, w13, w2, wts, (ids + 1) % 8), atol=1e-3)
    assert not torch.allclose(base, reference.fused_moe(x, w13, w2, wts.flip(1), ids), atol=1e-3)
    assert not torch.allclose(base, torch_backend.fused_moe(x, w13, w2, wts, (ids + 1) % 8), atol=1e-3)


# ------------------------------------------------------------------------------ Triton (kernels/moe.py)
# On a GPU: every case of CASES in three dtypes. Under TRITON_INTERPRET=1 (tests/conftest.py sets it without a
# GPU): a subset that still has T = 1, 7, 33, 100, E = 4 .. 64, k = 1, 2, 8 and both routings, fp32 and fp16 only
# (the interpreter's bf16 tl.dot is wrong; bf16 is skipped there, never on a GPU).


def _triton_device() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None


TRITON_DEVICE = _triton_device()
INTERPRETED = TRITON_DEVICE == "cpu"
# (T, E, k, routing): under the interpreter one routing per case, alternating; on a GPU both for every case
TRITON_CASES = ([(1, 4, 2, "skewed"), (1, 64, 8, "random"), (7, 8, 1, "skewed"), (7, 4, 2, "random"),
                 (33, 8, 8, "random"), (33, 64, 2, "skewed"), (100, 8, 2, "skewed"), (100, 4, 1, "random")]
                if INTERPRETED else [(*c, r) for c in CASES for r in ("random", "skewed")])
needs_triton = pytest.mark.skipif(TRITON_DEVICE is None, reason="Triton needs a CUDA GPU or TRITON_INTERPRET=1")


def _on_triton_device(case: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    assert TRITON_DEVICE is not None
    return tuple(u.to(TRITON_DEVICE) for u in case)


# The Triton interpreter's bf16 tl.dot is wrong: bf16 cases are GPU tests there (marked, so they run on a GPU).
TRITON_DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.gpu) if INTERPRETED else torch.bfloat16,
                 torch.float16]


@needs_triton
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("t,e,k,routing", TRITON_CASES)
def test_triton_matches_reference(t, e, k, dtype, routing):
    from fastinfer.ops import triton_backend

    ids_dtype = torch.int32 if (t + e + k) % 2 else torch.int64
    case = _on_triton_device(moe_case(t, e, k, dtype, routing, ids_dtype, seed=t * 100 + e + k))
    out = triton_backend.fused_moe(*case)
    assert out.shape == (t, HIDDEN) and out.dtype == dtype and out.device == case[0].device
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, reference.fused_moe(*case), atol=atol, rtol=rtol)


@needs_triton
@pytest.mark.parametrize("block_m,block_n,block_k", [(16, 16, 16), (32, 64, 32), (64, 32, 64)])
@pytest.mark.parametrize("t", [1, 45])
def test_triton_block_sizes(t, block_m, block_n, block_k):
    """Forced tiles: BLOCK_M 16 .. 64 (decode and prefill groupings), blocks wider than H / I (masked columns)
    and narrower (several column programs)."""
    from fastinfer.kernels import moe as M

    case = _on_triton_device(moe_case(t, 8, 2, torch.float32, "skewed", seed=t))
    out = M.fused_moe(*case, config=M.MoEConfig(block_m, block_n, block_k, 4, 1))
    torch.testing.assert_close(out, reference.fused_moe(*case), atol=1e-5, rtol=1e-5)


@needs_triton
def test_triton_is_deterministic_and_routing_matters():
    from fastinfer.ops import triton_backend

    x, w13, w2, wts, ids = _on_triton_device(moe_case(33, 8, 2, torch.float32))
    out = triton_backend.fused_moe(x, w13, w2, wts, ids)
    assert torch.equal(out, triton_backend.fused_moe(x, w13, w2, wts, ids)), "two runs differ"
    assert not torch.allclose(out, triton_backend.fused_moe(x, w13, w2, wts, (ids + 1) % 8), atol=1e-3)
    assert not torch.allclose(out, triton_backend.fused_moe(x, w13, w2, wts.flip(1), ids), atol=1e-3)


@needs_triton
def test_triton_empty_and_bad_inputs():
    from fastinfer.ops import triton_backend

    x, w13, w2, wts, ids = _on_triton_device(moe_case(3, 4, 2, torch.float32))
    assert triton_backend.fused_moe(x[:0], w13, w2, wts[:0], ids[:0]).shape == (0, HIDDEN)
    with pytest.raises(AssertionError, match="w2 must be"):
        triton_backend.fused_moe(x, w13, w2[:, :, :-1].contiguous(), wts, ids)
    with pytest.raises(AssertionError, match="topk_weights must be float32"):
        triton_backend.fused_moe(x, w13, w2, wts.double(), ids)
    with pytest.raises(AssertionError, match="must be x's"):
        triton_backend.fused_moe(x, w13.half(), w2, wts, ids)


@pytest.mark.parametrize("block_m", [1, 4, 16])
@pytest.mark.parametrize("t,e,k", [(1, 4, 2), (7, 8, 2), (33, 64, 8), (20, 6, 3)])
def test_moe_align(t, e, k, block_m):
    """The sort the grouped GEMMs read, against the same grouping built in plain Python: each expert's pairs in
    token order, padded to a multiple of BLOCK_M with the sentinel N, no block for an expert without pairs,
    within the documented bound."""
    pytest.importorskip("triton")
    from fastinfer.kernels import moe as M

    _, _, _, _, ids = moe_case(t, e, k, torch.float32, "skewed", seed=t + e)
    sorted_pairs, block_experts, num_padded = M.moe_align(ids, e, block_m)
    n, flat = t * k, ids.reshape(-1).tolist()
    want_pairs, want_experts = [], []
    for ex in range(e):
        pairs = [p for p in range(n) if flat[p] == ex]
        pad = -len(pairs) % block_m
        want_pairs += pairs + [n] * pad
        want_experts += [ex] * ((len(pairs) + pad) // block_m)
    length = M.padded_bound(n, e, block_m)
    assert len(want_pairs) <= length and length % block_m == 0
    assert sorted_pairs.shape == (length,) and sorted_pairs.dtype == torch.int32
    assert num_padded.tolist() == [len(want_pairs)]
    assert sorted_pairs.tolist() == want_pairs + [n] * (length - len(want_pairs))
    assert block_experts.tolist() == want_experts + [e] * (length // block_m - len(want_experts))


@needs_triton
def test_triton_traces_on_fake_cuda():
    """The custom op's fake checks the inputs and allocates [T, H]; no launch, no host read."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastinfer.ops import triton_backend

    with FakeTensorMode():
        x = torch.empty(5, HIDDEN, dtype=torch.bfloat16, device="cuda")
        w13 = torch.empty(8, 2 * INTER, HIDDEN, dtype=torch.bfloat16, device="cuda")
        w2 = torch.empty(8, HIDDEN, INTER, dtype=torch.bfloat16, device="cuda")
        wts = torch.empty(5, 2, dtype=torch.float32, device="cuda")
        ids = torch.empty(5, 2, dtype=torch.int32, device="cuda")
        out = triton_backend.fused_moe(x, w13, w2, wts, ids)
        assert (out.shape, out.dtype, out.device.type) == ((5, HIDDEN), torch.bfloat16, "cuda")
        with pytest.raises(AssertionError, match="topk_weights on cpu"):
            triton_backend.fused_moe(x, w13, w2, torch.empty(5, 2), ids)


# ------------------------------------------------------------------------------ C++ (csrc/cpu/fused_moe.cpp)
# Every case of CASES in three dtypes on each instruction-set variant the CPU runs (generic, avx2, avx512; the
# kernel runs its AVX-512 code for avx512_bf16 too): both routings on the widest variant, one (alternating by
# case) on the others; 2 threads on shapes big enough to split both phases.


def _cpp():
    pytest.importorskip("fastinfer._C", reason="compiled extension not built (pip install -e . --no-build-isolation)")
    from fastinfer.ops import cpp_backend

    return cpp_backend


MOE_ISAS = [v for v in SUPPORTED_ISAS if v != "avx512_bf16"]


def _cpp_params() -> list:
    out = []
    for isa in MOE_ISAS:
        for t, e, k in CASES:
            for routing in ("random", "skewed"):
                if isa == MOE_ISAS[-1] or routing == ("skewed" if (t + e + k) % 2 else "random"):
                    out.append(pytest.param(isa, t, e, k, routing, id=f"{isa}-{t}-{e}-{k}-{routing}"))
    return out


@pytest.fixture
def forced_isa(request):
    """Force the kernel variant named by the test's ``isa`` argument, then restore detection."""
    cpp = _cpp()
    assert cpp.cpu_isa(request.getfixturevalue("isa")) == request.getfixturevalue("isa")
    yield
    cpp.cpu_isa("auto")


@pytest.fixture
def threads(request):
    """torch's (and so the kernel's) thread count for the test: ``threads`` argument, default 1."""
    old = torch.get_num_threads()
    torch.set_num_threads(getattr(request, "param", 1))
    yield torch.get_num_threads()
    torch.set_num_threads(old)


@pytest.mark.usefixtures("forced_isa", "threads")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("isa,t,e,k,routing", _cpp_params())
def test_cpp_matches_reference(isa, t, e, k, routing, dtype):
    """One thread (the small cases would run on one anyway; the 2-thread split is test_cpp_shapes_and_threads)."""
    cpp = _cpp()
    ids_dtype = torch.int32 if (t + e + k) % 2 else torch.int64
    case = moe_case(t, e, k, dtype, routing, ids_dtype, seed=t * 100 + e + k)
    out = cpp.fused_moe(*case)
    assert out.shape == (t, HIDDEN) and out.dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, reference.fused_moe(*case), atol=atol, rtol=rtol)


@pytest.mark.usefixtures("forced_isa")
@pytest.mark.parametrize("threads", [2], indirect=True, ids=["2threads"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hidden,inter", [(1024, 352), (200, 97), (16, 1)])
@pytest.mark.parametrize("isa", MOE_ISAS)
def test_cpp_shapes_and_threads(isa, hidden, inter, dtype, threads):
    """Sizes big enough to split over 2 threads (both phases), odd I (the single-pair tail), H < one vector;
    1, 2 and 19 tokens."""
    cpp = _cpp()
    gen = torch.Generator().manual_seed(hidden + inter)
    e, k, t = 8, 2, 19
    x = torch.randn(t, hidden, generator=gen).to(dtype)
    w13 = (torch.randn(e, 2 * inter, hidden, generator=gen) / hidden ** 0.5).to(dtype)
    w2 = (torch.randn(e, hidden, inter, generator=gen) / inter ** 0.5).to(dtype)
    vals, ids = torch.randn(t, e, generator=gen).topk(k, dim=1)
    wts = vals.softmax(dim=1)
    assert threads == 2
    for n in (1, 2, t):
        sub = (x[:n], w13, w2, wts[:n], ids[:n])
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(cpp.fused_moe(*sub), reference.fused_moe(*sub), atol=atol, rtol=rtol)


def test_cpp_reads_only_chosen_experts():
    """NaN in every expert no token chose must not reach the output (the kernel never reads them); a repeated
    expert in a token's top-k counts twice, as in the formula."""
    cpp = _cpp()
    x, w13, w2, wts, ids = moe_case(5, 8, 2, torch.float32, "skewed")
    w13, w2 = w13.clone(), w2.clone()
    w13[1::2], w2[1::2] = float("nan"), float("nan")
    out = cpp.fused_moe(x, w13, w2, wts, ids)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference.fused_moe(x, w13.nan_to_num(), w2.nan_to_num(), wts, ids),
                               atol=1e-5, rtol=1e-5)
    twice = ids[:, :1].repeat(1, 2)
    torch.testing.assert_close(cpp.fused_moe(x, w13, w2, wts, twice), per_token(x, w13, w2, wts, twice).float(),
                               atol=1e-5, rtol=1e-5)


def test_cpp_routing_matters_and_bad_inputs():
    cpp = _cpp()
    x, w13, w2, wts, ids = moe_case(7, 8, 2, torch.float32)
    base = cpp.fused_moe(x, w13, w2, wts, ids)
    assert torch.equal(base, cpp.fused_moe(x, w13, w2, wts, ids)), "two runs differ"
    assert not torch.allclose(base, cpp.fused_moe(x, w13, w2, wts, (ids + 1) % 8), atol=1e-3)
    assert not torch.allclose(base, cpp.fused_moe(x, w13, w2, wts.flip(1), ids), atol=1e-3)
    assert cpp.fused_moe(x[:0], w13, w2, wts[:0], ids[:0]).shape == (0, HIDDEN)
    with pytest.raises(ValueError, match=r"outside \[0, num_experts\)"):
        cpp.fused_moe(x, w13, w2, wts, ids + 8)
    with pytest.raises(ValueError, match="does not fit"):
        cpp.fused_moe(x, w13, w2[:, :, :-1].contiguous(), wts, ids)
    with pytest.raises(ValueError, match=r"\[T, k\]"):
        cpp.fused_moe(x, w13, w2, wts[:, :1], ids)


def test_cpp_falls_back_with_a_warning(caplog):
    """Mixed dtypes are not a kernel case: the torch backend runs, and the log says so (once)."""
    cpp = _cpp()
    x, w13, w2, wts, ids = moe_case(3, 4, 2, torch.float32)
    with caplog.at_level("WARNING", logger="fastinfer.ops"):
        out = cpp.fused_moe(x, w13.bfloat16(), w2.bfloat16(), wts, ids)
    assert "fused_moe mixed dtypes" in caplog.text and "torch backend" in caplog.text
    torch.testing.assert_close(out, torch_backend.fused_moe(x, w13.bfloat16(), w2.bfloat16(), wts, ids))


def test_cpp_traces_under_fake_mode_and_opcheck():
    """The fake allocates [T, H] with no data read; opcheck: schema, fake vs real metadata, AOT dispatch."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    cpp = _cpp()
    case = moe_case(5, 8, 2, torch.bfloat16, ids_dtype=torch.int32)
    with FakeTensorMode() as mode:
        fake = tuple(mode.from_tensor(u) for u in case)
        out = cpp.fused_moe(*fake)
        assert isinstance(out, FakeTensor) and (out.shape, out.dtype) == ((5, HIDDEN), torch.bfloat16)
    torch.library.opcheck(torch.ops.fastinfer.fused_moe.default, case)


# The sm_90 compile check of tests/ops/test_triton_kernels.py (its ``build`` helper) on both MoE kernels, with the
# configs the launcher picks on a GPU for decode (BLOCK_M 16), mid-size and prefill batches (BLOCK_M 32 / 64) and
# fp32: catches what the interpreter cannot (dot shape rules, shared memory over the H200 limit).
_MOE_COMPILE = r"""
import torch
from fastinfer.kernels import moe as MO
gpu = torch.device("cuda", 0)
ptrs = {"pairs_ptr": "*i32", "experts_ptr": "*i32", "npad_ptr": "*i32", "tw_ptr": "*fp32", "buf_ptr": "*fp32",
        "s_ptr": "*fp32", "m_ptr": "*fp32"}
for pairs, dt, tdt, bits in [(2, "*bf16", torch.bfloat16, 0), (256, "*bf16", torch.bfloat16, 0),
                             (8192, "*fp16", torch.float16, 0), (8192, "*bf16", torch.bfloat16, 0),
                             (64, "*fp32", torch.float32, 0), (2, "*bf16", torch.bfloat16, 4),
                             (256, "*fp16", torch.float16, 8), (8192, "*bf16", torch.bfloat16, 4)]:
    c = MO.moe_config(pairs, 8, tdt, gpu, quantized=bits > 0)
    consts = dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, DOT_PRECISION=MO._dot_precision(tdt),
                  W_BITS=bits, GROUP=32 if bits == 4 else 4096, HAS_MINS=bits == 4)
    wp = {"w_ptr": {0: dt, 8: "*i8", 4: "*u8"}[bits]}
    for fn in (MO._gate_up_kernel, MO._down_kernel):
        build(fn, dt, consts, {**ptrs, **wp}, warps=c.num_warps, stages=c.num_stages)
print("ALL COMPILED")
"""


@pytest.mark.skipif(sys.platform != "linux", reason="the triton wheel ships ptxas for linux")
def test_moe_kernels_compile_for_hopper():
    pytest.importorskip("triton")
    from tests.ops.test_triton_kernels import _COMPILE_SCRIPT

    marker = "\nidx = "  # the shared script's setup and ``build`` end where its attention cases begin
    assert marker in _COMPILE_SCRIPT, "tests/ops/test_triton_kernels.py changed its compile script's layout"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT.split(marker)[0] + _MOE_COMPILE,
                           str(Path(__file__).resolve().parents[2])], capture_output=True, text=True, env=env,
                          timeout=300)
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0 and "ALL COMPILED" in proc.stdout, (proc.stdout + proc.stderr)[-4000:]


def test_moe_align_makes_no_host_read():
    """The alignment runs on fake CUDA tensors (no data: a host read or a data-dependent shape would raise), so it
    never synchronises with the device; its sizes are the documented bound."""
    pytest.importorskip("triton")
    from fastinfer.kernels import moe as M
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        ids = torch.empty(5, 2, dtype=torch.int32, device="cuda")
        sorted_pairs, block_experts, num_padded = M.moe_align(ids, 8, 16)
        assert sorted_pairs.device.type == "cuda" and sorted_pairs.shape == (M.padded_bound(10, 8, 16),)
        assert block_experts.shape == (M.padded_bound(10, 8, 16) // 16,) and num_padded.shape == (1,)
