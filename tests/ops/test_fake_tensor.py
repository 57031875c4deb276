"""Every op traces without data: under FakeTensorMode on a fake CUDA device (a CPU-only torch can create those;
no GPU, no driver) and under torch.compile. The Triton ops are torch custom ops (``fastinfer::triton_*``) with
fake implementations; the torch backend must make no host read (a fake tensor has no data, so ``.item()``,
``int(t.min())`` or ``.tolist()`` would raise here)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from fastinfer.ops import AttentionMetadata, OpSet, reference, torch_backend
from fastinfer.ops.registry import OPS, OPS_WITHOUT_TRITON
from fastinfer.quantization import quantize
from tests.ops.paged_cases import paged_case

CUDA = torch.device("cuda", 0)  # a bare "cuda" in .to() asks the driver for the current device
H, HKV, D, BS = 4, 2, 32, 4  # query heads, KV heads, head dim, block size
QUERY_LENS, SEQ_LENS = [1, 1, 5, 3], [9, 17, 5, 12]  # two decodes, a prefill, a chunked prefill
BLOCKS = [[0, 1, 2], [3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
T = sum(QUERY_LENS)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _backend(name: str):
    if name == "opset-cuda":
        if not _triton_available():
            pytest.skip("triton not installed: OpSet('cuda') resolves to the torch backend")
        return OpSet("cuda")
    return torch_backend


def _quantized(mode: FakeTensorMode):
    """A real int4 weight (g32), turned into fake CUDA tensors: (qweight, scales, mins)."""
    qw = quantize(torch.randn(24, 64, generator=torch.Generator().manual_seed(0)) * 0.05, "int4", 32)
    return tuple(mode.from_tensor(t).to(CUDA) for t in (qw.qweight, qw.scales, qw.mins))


def test_fake_cuda_tensors_need_no_gpu():
    with FakeTensorMode():
        x = torch.empty(3, 4, device="cuda")
        y = torch.tensor([1, 2, 3], device="cuda")
        assert isinstance(x, FakeTensor) and x.device == CUDA and (x + 1).device == CUDA and y.device == CUDA


def test_opset_cuda_resolves_without_gpu(caplog):
    if not _triton_available():
        pytest.skip("triton not installed")
    with caplog.at_level("INFO", logger="fastinfer.ops"):
        ops = OpSet("cuda")
    # every kernel op in Triton; the greedy argmax and the token bitmask are torch's (a few device kernels each,
    # nothing to fuse) and so is W4A8 (a CPU technique)
    not_triton = {op: b for op, b in ops.chosen.items() if b != "triton"}
    assert not_triton == dict.fromkeys(OPS_WITHOUT_TRITON, "torch"), ops.chosen
    assert set(OPS_WITHOUT_TRITON) == {"argmax", "quant_linear_a8", "apply_token_bitmask"}
    assert "ops on cuda: store_kv=triton" in caplog.text and "cpp skipped" in caplog.text


@pytest.mark.parametrize("backend", ["opset-cuda", "torch"])
def test_every_op_traces_on_fake_cuda(backend):
    be = _backend(backend)
    dt = torch.bfloat16
    called = []
    with FakeTensorMode() as mode:
        meta = AttentionMetadata.build(QUERY_LENS, SEQ_LENS, BLOCKS, BS, "cuda")
        for name in ("query_start_loc", "seq_lens", "block_table", "slot_mapping"):
            t = getattr(meta, name)
            assert isinstance(t, FakeTensor) and t.device == CUDA, name
        assert meta.block_table.shape == (4, 5) and meta.slot_mapping.shape == (T,)
        assert meta.slot_mapping.dtype == torch.int64 and meta.seq_lens.dtype == torch.int32

        k_cache = torch.empty(16, BS, HKV, D, dtype=dt, device="cuda")  # [num_blocks, block_size, Hkv, D]
        v_cache = torch.empty_like(k_cache)
        qkv = torch.empty(T, (H + 2 * HKV) * D, dtype=dt, device="cuda")  # q, k, v as strided views
        q = qkv.narrow(1, 0, H * D).view(T, H, D)
        k = qkv.narrow(1, H * D, HKV * D).view(T, HKV, D)
        v = qkv.narrow(1, (H + HKV) * D, HKV * D).view(T, HKV, D)
        positions = torch.empty(T, dtype=torch.int64, device="cuda")
        cos_sin = torch.empty(64, D, dtype=torch.float32, device="cuda")

        q2, k2 = be.rotary_embedding(positions, q, k, cos_sin)
        called.append("rotary_embedding")
        assert (q2.shape, k2.shape, q2.dtype, q2.device) == (q.shape, k.shape, dt, CUDA)
        be.store_kv(k2, v, k_cache, v_cache, meta.slot_mapping)
        called.append("store_kv")
        for window, softcap in ((None, None), (8, None), (8, 30.0)):
            out = be.paged_attention(q2, k_cache, v_cache, meta, D ** -0.5, window, softcap)
            assert (out.shape, out.dtype, out.device) == ((T, H, D), dt, CUDA)
        called.append("paged_attention")

        x = torch.empty(T, 64, dtype=dt, device="cuda")
        w = torch.empty(64, dtype=dt, device="cuda")
        y = be.rms_norm(x, w, 1e-6)
        called.append("rms_norm")
        y2, res = be.fused_add_rms_norm(x, x, w, 1e-6)
        called.append("fused_add_rms_norm")
        for t in (y, y2, res):
            assert (t.shape, t.dtype, t.device) == (x.shape, dt, CUDA)
        assert be.rms_norm(x, w.float(), 1e-6).dtype == torch.float32  # promote_types(weight, x)

        s = be.silu_and_mul(torch.empty(T, 3, 128, dtype=dt, device="cuda"))
        called.append("silu_and_mul")
        assert (s.shape, s.dtype, s.device) == ((T, 3, 64), dt, CUDA)

        be.copy_blocks(k_cache, v_cache, torch.empty(3, 2, dtype=torch.int64, device="cuda"))
        called.append("copy_blocks")

        qweight, scales, mins = _quantized(mode)
        bias = torch.empty(24, dtype=dt, device="cuda")
        y = be.quant_linear(torch.empty(2, T, 64, dtype=dt, device="cuda"), qweight, scales, mins, 4, 32, bias)
        called.append("quant_linear")
        y = be.quant_linear_a8(torch.empty(2, T, 64, dtype=dt, device="cuda"), qweight, scales, mins, 32, bias)
        called.append("quant_linear_a8")
        assert (y.shape, y.dtype, y.device) == ((2, T, 24), dt, CUDA)
        assert (y.shape, y.dtype, y.device) == ((2, T, 24), dt, CUDA)

        w13 = torch.empty(8, 80, 64, dtype=dt, device="cuda")  # [E, 2I, H]
        w2 = torch.empty(8, 64, 40, dtype=dt, device="cuda")
        for tokens in (T, 2):  # the torch backend's dense and gathered forms (T*k > E, T*k <= E)
            x = torch.empty(tokens, 64, dtype=dt, device="cuda")
            weights = torch.empty(tokens, 2, dtype=torch.float32, device="cuda")
            ids = torch.empty(tokens, 2, dtype=torch.int32, device="cuda")
            y = be.fused_moe(x, w13, w2, weights, ids)
            assert (y.shape, y.dtype, y.device) == ((tokens, 64), dt, CUDA)
        q13 = torch.empty(8, 80, 32, dtype=torch.uint8, device="cuda")  # int4 experts, group 32
        s13 = torch.empty(8, 80, 2, dtype=torch.float32, device="cuda")
        y = be.fused_moe(x, q13, w2, weights, ids, s13, s13)
        assert (y.shape, y.dtype, y.device) == ((2, 64), dt, CUDA)
        called.append("fused_moe")

        tok = be.argmax(torch.empty(T, 1000, dtype=torch.float32, device="cuda"))
        assert (tok.shape, tok.dtype, tok.device) == ((T,), torch.int64, CUDA)
        called.append("argmax")

        logits = torch.empty(T, 1000, dtype=torch.float32, device="cuda")
        be.apply_token_bitmask(logits, torch.empty(T, 32, dtype=torch.int32, device="cuda"))
        assert (logits.shape, logits.device) == ((T, 1000), CUDA)
        called.append("apply_token_bitmask")
    assert sorted(called) == sorted(OPS), "a new op needs a case here"


@pytest.mark.parametrize("backend", ["opset-cuda", "torch"])
def test_a_cpu_tensor_mixed_in_raises(backend):
    """Proves the checks above can fail: the fakes (and torch's device propagation) reject a CPU tensor."""
    be = _backend(backend)
    with FakeTensorMode():
        cpu_meta = AttentionMetadata.build(QUERY_LENS, SEQ_LENS, BLOCKS, BS, "cpu")
        k_cache = torch.empty(16, BS, HKV, D, device="cuda")
        q = torch.empty(T, H, D, device="cuda")
        k = torch.empty(T, HKV, D, device="cuda")
        with pytest.raises((AssertionError, RuntimeError), match="device"):
            be.paged_attention(q, k_cache, k_cache.clone(), cpu_meta, 0.1)
        with pytest.raises((AssertionError, RuntimeError), match="device"):
            be.store_kv(k, k, k_cache, k_cache.clone(), cpu_meta.slot_mapping)
        with pytest.raises((AssertionError, RuntimeError), match="device"):
            be.rms_norm(q, torch.empty(D), 1e-6)


# A host read of a fake tensor raises: data-dependent output (with a CUDA runtime), or, on a CPU-only torch, the
# device guard that reading a CUDA tensor takes.
_HOST_READ = "_local_scalar_dense|[Dd]ata.dependent|not linked with support for cuda"


def test_a_host_read_fails_under_fake_mode():
    """What the torch backend must not do (its old store_kv read ``int(slot_mapping.min())``)."""
    with FakeTensorMode():
        slots = torch.empty(T, dtype=torch.int64, device="cuda")
        with pytest.raises(Exception, match=_HOST_READ):
            int(slots.min())
        k_cache = torch.empty(16, BS, HKV, D, device="cuda")
        k = torch.empty(T, HKV, D, device="cuda")
        with pytest.raises(Exception, match=_HOST_READ):
            reference.store_kv(k, k, k_cache, k_cache.clone(), slots)  # the spec loops over slots.tolist()


def test_metadata_build_values_and_fake_cuda():
    meta = AttentionMetadata.build([1, 3], [5, 3], [[0, 1], [2]], 4)
    assert meta.query_start_loc.tolist() == [0, 1, 4] and meta.seq_lens.tolist() == [5, 3]
    assert meta.block_table.tolist() == [[0, 1], [2, 0]] and meta.slot_mapping.tolist() == [4, 8, 9, 10]
    assert meta.num_decodes == 1 and meta.max_query_len == 3 and meta.max_seq_len == 5
    with FakeTensorMode():
        fake = AttentionMetadata.build([1, 3], [5, 3], [[0, 1], [2]], 4, "cuda")
    assert fake.block_table.device == CUDA and fake.block_table.shape == (2, 2)
    assert fake.query_start_loc.dtype == torch.int32 and fake.num_decodes == 1
    with pytest.raises(ValueError, match="cannot hold position 39"):
        AttentionMetadata.build([3], [40], [[0, 1]], 16)


def _triton_device() -> str | None:
    """Where the Triton kernels really run here: a GPU, or CPU tensors under the interpreter; None: nowhere."""
    if not _triton_available():
        return None
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None


def _opcheck_cases(dev: str) -> dict:
    """Small real inputs for each Triton custom op."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(dev, dtype)

    q, kc, vc, meta = paged_case([1, 3], [6, 5], 4, 2, 16, 4, torch.float32, device=dev)
    kc, vc = kc.nan_to_num(), vc.nan_to_num()  # opcheck compares outputs, and unwritten slots are NaN
    qw = quantize(torch.randn(8, 64, generator=gen) * 0.05, "int4", 32)
    t = q.shape[0]
    o = torch.ops.fastinfer
    return {
        "store_kv": (o.triton_store_kv, (rand(t, 2, 16), rand(t, 2, 16), kc.clone(), vc.clone(), meta.slot_mapping)),
        "paged_attention": (o.triton_paged_attention, (q, kc, vc, meta.block_table, meta.seq_lens,
                                                       meta.query_start_loc, 0.25, 2, 1, 6, 3, 0.5)),
        "rms_norm": (o.triton_rms_norm, (rand(3, 32), rand(32), 1e-6)),
        "fused_add_rms_norm": (o.triton_fused_add_rms_norm, (rand(3, 32), rand(3, 32), rand(32), 1e-6)),
        "rotary_embedding": (o.triton_rotary_embedding, (torch.tensor([0, 3, 5], device=dev), rand(3, 4, 16),
                                                         rand(3, 2, 16), rand(8, 16))),
        "silu_and_mul": (o.triton_silu_and_mul, (rand(3, 32),)),
        "copy_blocks": (o.triton_copy_blocks, (kc.clone(), vc.clone(), torch.tensor([[0, 3]], device=dev))),
        "quant_linear": (o.triton_quant_linear, (rand(2, 64), qw.qweight.to(dev), qw.scales.to(dev),
                                                 qw.mins.to(dev), 4, 32, None)),
        "fused_moe": (o.triton_fused_moe, (rand(5, 24), rand(4, 16, 24) * 0.2, rand(4, 24, 8) * 0.3,
                                           rand(5, 2).softmax(1), torch.randint(0, 4, (5, 2), generator=gen).to(dev))),
    }


# argmax on a GPU is torch's own kernel; quant_linear_a8 (W4A8, a CPU technique) runs the torch backend there
@pytest.mark.parametrize("op", [op for op in OPS if op not in OPS_WITHOUT_TRITON])
def test_triton_custom_op_opcheck(op):
    """torch.library.opcheck: the schema declares every mutation, the fake matches the real output's metadata,
    and the op survives AOT dispatch (what torch.compile does to it)."""
    dev = _triton_device()
    if dev is None:
        pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1")
    import fastinfer.ops.triton_backend  # noqa: F401  (registers the ops)

    fn, args = _opcheck_cases(dev)[op]
    torch.library.opcheck(fn.default, args)


@pytest.mark.parametrize("op", ["store_kv", "paged_attention", "quant_linear"])
def test_cpp_op_opcheck(op):
    """The compiled CPU ops (csrc/bindings.cpp) and their fakes in fastinfer.ops.cpp_backend."""
    pytest.importorskip("fastinfer._C", reason="compiled extension not built")
    import fastinfer.ops.cpp_backend  # noqa: F401  (registers the fakes)

    q, kc, vc, meta = paged_case([1, 3], [6, 5], 4, 2, 16, 4, torch.float32)
    kc, vc = kc.nan_to_num(), vc.nan_to_num()
    gen = torch.Generator().manual_seed(0)
    t = q.shape[0]
    qw = quantize(torch.randn(8, 64, generator=gen) * 0.05, "int4", 32)
    o = torch.ops.fastinfer
    fn, args = {
        "store_kv": (o.store_kv, (torch.randn(t, 2, 16, generator=gen), torch.randn(t, 2, 16, generator=gen),
                                  kc.clone(), vc.clone(), meta.slot_mapping)),
        "paged_attention": (o.paged_attention, (q, kc, vc, meta.block_table, meta.seq_lens, meta.query_start_loc,
                                                0.25, 2, torch.empty_like(q), 0.5)),
        "quant_linear": (o.quant_linear, (torch.randn(2, 64, generator=gen), qw.qweight, qw.scales, qw.mins, 4, 32,
                                          None)),
    }[op]
    torch.library.opcheck(fn.default, args)


def _compile_backends() -> list:
    out = [pytest.param("torch", id="torch")]
    try:
        import fastinfer.ops.cpp_backend  # noqa: F401
        out.append(pytest.param("cpp", id="cpp"))
    except ImportError:
        out.append(pytest.param("cpp", id="cpp", marks=pytest.mark.skip(reason="fastinfer._C not built")))
    out.append(pytest.param("triton", id="triton"))
    return out


@pytest.mark.parametrize("kv_cache_dtype", [None, "int8"])
@pytest.mark.parametrize("name", _compile_backends())
def test_torch_compile_store_and_attend(name, kv_cache_dtype):
    """One compiled graph (fullgraph: no graph break, so no host read) for store_kv + paged_attention, equal to
    eager, on a float and an int8 KV cache. aot_eager runs the functionalized graph without codegen (cheap on
    CPU)."""
    import importlib

    dev = "cpu"
    if name == "triton":
        dev = _triton_device()
        if dev is None:
            pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1")
    be = importlib.import_module(f"fastinfer.ops.{name}_backend")
    q, kc, vc, meta = paged_case([1, 3], [6, 5], 4, 2, 16, 4, torch.float32, device=dev,
                                 kv_cache_dtype=kv_cache_dtype)
    kc, vc = kc.nan_to_num(), vc.nan_to_num()
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(q.shape[0], 2, 16, generator=gen).to(dev)
    v = torch.randn(q.shape[0], 2, 16, generator=gen).to(dev)

    def step(q, k, v, k_cache, v_cache, meta):
        be.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return be.paged_attention(q, k_cache, v_cache, meta, 0.25)

    k_ref, v_ref = kc.clone(), vc.clone()
    ref = step(q, k, v, k_ref, v_ref, meta)
    torch._dynamo.reset()
    out = torch.compile(step, backend="aot_eager", fullgraph=True)(q, k, v, kc, vc, meta)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(kc, k_ref) and torch.equal(vc, v_ref), "the compiled graph lost a cache write"


_NO_INTERPRETER_SCRIPT = r"""
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from fastinfer.ops import AttentionMetadata, OpSet
from fastinfer.ops.registry import OPS_WITHOUT_TRITON
ops = OpSet("cuda")
assert {op: b for op, b in ops.chosen.items() if b != "triton"} == dict.fromkeys(OPS_WITHOUT_TRITON, "torch")
with FakeTensorMode():
    meta = AttentionMetadata.build([1, 4], [9, 4], [[0, 1, 2], [3]], 4, "cuda")
    kc = torch.empty(8, 4, 2, 16, dtype=torch.float16, device="cuda")
    q = torch.empty(5, 4, 16, dtype=torch.float16, device="cuda")
    ops.store_kv(q.narrow(1, 0, 2), q.narrow(1, 2, 2), kc, kc.clone(), meta.slot_mapping)
    out = ops.paged_attention(q, kc, kc.clone(), meta, 0.25)
    assert out.shape == q.shape and out.device.type == "cuda", out
print("ok")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_opset_cuda_without_interpreter_or_gpu():
    """The real setting: no GPU, no TRITON_INTERPRET. The Triton backend still imports, resolves for "cuda"
    and traces a fake forward (it would need the GPU only to launch)."""
    if not _triton_available():
        pytest.skip("triton not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _NO_INTERPRETER_SCRIPT], env=env, cwd=root, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr
