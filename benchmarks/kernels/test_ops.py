"""Kernel micro-benchmarks on pytest-benchmark: every op of the op set on every backend that runs here, one
benchmark per (op, backend, shape), so each op's backends print side by side:

    pytest benchmarks/kernels --benchmark-only --benchmark-group-by=param
    pytest benchmarks/kernels --benchmark-only --benchmark-group-by=param -k "rms_norm or argmax"

Backends: ``torch`` (the portable torch backend), ``cpp-<isa>`` (the compiled CPU kernels, each instruction-set
variant this CPU runs, forced per benchmark), ``triton`` (CUDA GPUs only), and for ``quant_linear`` a
``bitsandbytes`` row (its 8-bit / 4-bit matmul) when the installed bitsandbytes build runs on this CPU: the row
skips with the reason otherwise. Shapes are decode (1 token) and a small prefill at Llama / SmolLM2 proportions,
sized to run in seconds on 2 cores. Not timed tests: ``tests/test_kernel_benchmarks.py`` only runs each once.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from fastinfer.ops import AttentionMetadata, torch_backend  # noqa: E402
from tests.ops.conftest import SUPPORTED_ISAS  # noqa: E402

DTYPE = torch.bfloat16


def _backends() -> list[str]:
    out = ["torch"] + [f"cpp-{isa}" for isa in SUPPORTED_ISAS]
    if torch.cuda.is_available():
        out.append("triton")
    return out


def _module(backend: str) -> tuple[Any, str]:
    """(backend module, device) with the cpp ISA forced for ``cpp-<isa>``."""
    if backend == "torch":
        return torch_backend, "cuda" if torch.cuda.is_available() else "cpu"
    if backend == "triton":
        from fastinfer.ops import triton_backend

        return triton_backend, "cuda"
    from fastinfer.ops import cpp_backend

    isa = backend.removeprefix("cpp-")
    assert cpp_backend.cpu_isa(isa) == isa
    return cpp_backend, "cpu"


def _rand(*shape: int, dev: str, dtype: torch.dtype = DTYPE) -> torch.Tensor:
    return torch.randn(*shape, device=dev).to(dtype)


# Each builder: (module, device, **case) -> a zero-argument call of the op.
def _rms_norm(m, dev, t, h):
    x, w = _rand(t, h, dev=dev), _rand(h, dev=dev)
    return lambda: m.rms_norm(x, w, 1e-6)


def _fused_add_rms_norm(m, dev, t, h):
    x, r, w = _rand(t, h, dev=dev), _rand(t, h, dev=dev), _rand(h, dev=dev)
    return lambda: m.fused_add_rms_norm(x, r, w, 1e-6)


def _rotary_embedding(m, dev, t, hq, hk, d):
    from fastinfer.layers.rotary import cos_sin_cache

    qkv = _rand(t, (hq + 2 * hk) * d, dev=dev)
    q, k, _ = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    q, k = q.view(t, hq, d), k.view(t, hk, d)
    cache, pos = cos_sin_cache(d, 4096, 10000.0, None).to(dev), torch.arange(t, device=dev)
    return lambda: m.rotary_embedding(pos, q, k, cache)


def _silu_and_mul(m, dev, t, d):
    x = _rand(t, 2 * d, dev=dev)
    return lambda: m.silu_and_mul(x)


def _argmax(m, dev, b, v):
    x = torch.randn(b, v, device=dev)
    return lambda: m.argmax(x)


def _paged_attention(m, dev, t, ctx, hq, hk, d):
    bs = 16
    blocks = -(-ctx // bs)
    kc, vc = _rand(blocks + 1, bs, hk, d, dev=dev), _rand(blocks + 1, bs, hk, d, dev=dev)
    meta = AttentionMetadata.build([t], [ctx], [list(range(blocks))], bs, dev)
    q = _rand(t, hq, d, dev=dev)
    return lambda: m.paged_attention(q, kc, vc, meta, d ** -0.5)


def _quant_linear(m, dev, t, n, k, bits):
    from fastinfer.quantization.rtn import quantize_int4, quantize_int8

    w = torch.randn(n, k) * 0.02
    qw = quantize_int8(w) if bits == 8 else quantize_int4(w, 32, search=False)
    x = _rand(t, k, dev=dev)
    qweight, scales = qw.qweight.to(dev), qw.scales.to(dev)
    mins = None if qw.mins is None else qw.mins.to(dev)
    return lambda: m.quant_linear(x, qweight, scales, mins, bits, qw.group_size)


def _quant_linear_a8(m, dev, t, n, k):
    from fastinfer.quantization.rtn import quantize_int4

    qw = quantize_int4(torch.randn(n, k) * 0.02, 32, search=False)
    x = _rand(t, k, dev=dev)
    q, s, mn = qw.qweight.to(dev), qw.scales.to(dev), qw.mins.to(dev)
    return lambda: m.quant_linear_a8(x, q, s, mn, 32)


def _fused_moe(m, dev, t, h, i, e, k):
    x = _rand(t, h, dev=dev)
    w13, w2 = _rand(e, 2 * i, h, dev=dev) * 0.03, _rand(e, h, i, dev=dev) * 0.03
    vals, ids = torch.randn(t, e, device=dev).topk(k, dim=1)
    wts = vals.softmax(dim=1)
    return lambda: m.fused_moe(x, w13, w2, wts, ids)


def _apply_token_bitmask(m, dev, b, v):
    """Structured outputs: one grammar row per sequence, each allowing ~1% of the vocabulary (a JSON state)."""
    gen = torch.Generator().manual_seed(0)
    w = (v + 31) // 32
    mask = torch.zeros(b, w, dtype=torch.int32)
    mask[torch.rand(b, w, generator=gen) < 0.01] = -1
    logits = _rand(b, v, dev=dev, dtype=torch.float32)  # fp32 logits, as the sampler has them
    mask = mask.to(dev)
    return lambda: m.apply_token_bitmask(logits, mask)


def _store_kv(m, dev, t, hk, d):
    bs = 16
    kc, vc = _rand(t // bs + 2, bs, hk, d, dev=dev), _rand(t // bs + 2, bs, hk, d, dev=dev)
    key, value = _rand(t, hk, d, dev=dev), _rand(t, hk, d, dev=dev)
    slots = torch.arange(t, device=dev) + 3
    return lambda: m.store_kv(key, value, kc, vc, slots)


def _copy_blocks(m, dev, n, hk, d):
    kc, vc = _rand(2 * n + 1, 16, hk, d, dev=dev), _rand(2 * n + 1, 16, hk, d, dev=dev)
    pairs = torch.stack([torch.arange(n), torch.arange(n) + n], dim=1).to(dev)
    return lambda: m.copy_blocks(kc, vc, pairs)


OPS: dict[str, tuple[Callable[..., Callable[[], Any]], list[dict[str, int]]]] = {
    "store_kv": (_store_kv, [dict(t=1, hk=8, d=128), dict(t=128, hk=8, d=128)]),
    "copy_blocks": (_copy_blocks, [dict(n=1, hk=8, d=128), dict(n=16, hk=8, d=128)]),
    "rms_norm": (_rms_norm, [dict(t=1, h=576), dict(t=1, h=4096), dict(t=128, h=4096)]),
    "fused_add_rms_norm": (_fused_add_rms_norm, [dict(t=1, h=576), dict(t=1, h=4096), dict(t=128, h=4096)]),
    "rotary_embedding": (_rotary_embedding, [dict(t=1, hq=9, hk=3, d=64), dict(t=1, hq=32, hk=8, d=128),
                                             dict(t=128, hq=32, hk=8, d=128)]),
    "silu_and_mul": (_silu_and_mul, [dict(t=1, d=1536), dict(t=1, d=14336), dict(t=128, d=1536)]),
    "argmax": (_argmax, [dict(b=1, v=49152), dict(b=32, v=49152), dict(b=1, v=128256)]),
    "apply_token_bitmask": (_apply_token_bitmask, [dict(b=1, v=49152), dict(b=32, v=49152), dict(b=1, v=128256)]),
    "paged_attention": (_paged_attention, [dict(t=1, ctx=512, hq=9, hk=3, d=64),
                                           dict(t=1, ctx=2048, hq=32, hk=8, d=128)]),
    "quant_linear": (_quant_linear, [dict(t=1, n=4096, k=4096, bits=4), dict(t=1, n=4096, k=4096, bits=8),
                                     dict(t=16, n=1536, k=576, bits=4)]),
    "quant_linear_a8": (_quant_linear_a8, [dict(t=1, n=4096, k=4096), dict(t=16, n=1536, k=576)]),
    "fused_moe": (_fused_moe, [dict(t=1, h=1024, i=896, e=8, k=2), dict(t=16, h=1024, i=896, e=8, k=2)]),
}


def _case_id(op: str, case: dict[str, int]) -> str:
    return op + "-" + "-".join(f"{k}{v}" for k, v in case.items())


def _make(op: str, backend: str) -> Callable[..., None]:
    builder, cases = OPS[op]

    @pytest.mark.parametrize("case", cases, ids=[_case_id(op, c) for c in cases])
    def bench(benchmark, case):
        module, dev = _module(backend)
        if not hasattr(module, op):
            pytest.skip(f"{backend} has no {op} kernel: the op set runs the next backend's (see OpSet.describe)")
        try:
            fn = builder(module, dev, **case)
            with torch.inference_mode():
                fn()  # warm-up (and a crash here is a failure, not a timing)
                benchmark(fn)
        finally:
            if backend.startswith("cpp-"):
                module.cpu_isa("auto")

    bench.__name__ = f"test_{op}__{backend.replace('-', '_')}"
    return bench


for _op in OPS:
    for _backend in _backends():
        globals()[f"test_{_op}__{_backend.replace('-', '_')}"] = _make(_op, _backend)


@pytest.mark.parametrize("case", OPS["quant_linear"][1][:2], ids=[_case_id("quant_linear", c)
                                                                 for c in OPS["quant_linear"][1][:2]])
def test_quant_linear__bitsandbytes(benchmark, case):
    """bitsandbytes' weight-only matmul at the same shape (int8: ``Linear8bitLt``; int4: ``Linear4bit`` NF4), the
    baseline users would pick instead; skipped with the reason when its build does not run here."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        pytest.skip(f"bitsandbytes not installed ({e})")
    t, n, k, bits = case["t"], case["n"], case["k"], case["bits"]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        if bits == 8:
            layer = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=DTYPE, quant_type="nf4")
        layer = layer.to(dev)
        x = _rand(t, k, dev=dev)
        with torch.inference_mode():
            layer(x)
    except Exception as e:  # a build without this device's kernels
        pytest.skip(f"bitsandbytes {getattr(bnb, '__version__', '?')} does not run on {dev} here: {e}")
    with torch.inference_mode():
        benchmark(lambda: layer(x))
