"""The opt-in flash_attn attention backend (fastinfer.ops.flash_attn_backend): on a GPU with flash-attn, against
fastinfer.ops.reference on caches with blocks of 256 (mixed decode / prefill rows, window, softcap) and the logged
fallback for other block sizes; everywhere, a forced flash_attn that cannot run says why."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from fastinfer.ops import reference
from fastinfer.ops.registry import OpSet
from tests.ops.paged_cases import paged_case


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_forced_flash_attn_without_the_package_says_so():
    with pytest.raises(RuntimeError, match="backend 'flash_attn' was asked for but not importable .*flash-attn"):
        OpSet(device_type="cuda", prefer="flash_attn")
    with pytest.raises(RuntimeError, match="backend 'flash_attn' was asked for but needs a CUDA device"):
        OpSet(device_type="cpu", prefer="flash_attn")


def test_flash_attn_is_never_chosen_automatically():
    assert "flash_attn" not in OpSet(device_type="cpu").chosen.values()


CASES = {  # (query_lens, seq_lens, H, Hkv, D, block_size, window, softcap): decode rows first
    "mixed-gqa4": ([1, 1, 37, 64], [300, 1025, 100, 64], 32, 8, 128, 256, None, None),
    "window-softcap": ([1, 90], [700, 200], 8, 4, 64, 256, 128, 1.5),
    "blocks-16-fall-back": ([1, 20], [90, 20], 8, 2, 64, 16, None, None),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_flash_attn_paged_attention(case, dtype):
    fa = pytest.importorskip("fastinfer.ops.flash_attn_backend")
    qlens, slens, h, hkv, d, bs, window, softcap = case
    q, kc, vc, meta = paged_case(qlens, slens, h, hkv, d, bs, dtype, device="cuda")
    out = fa.paged_attention(q, kc, vc, meta, d ** -0.5, window, softcap)
    ref = reference.paged_attention(q.float(), kc.float(), vc.float(), meta, d ** -0.5, window, softcap)
    assert torch.isfinite(out).all()
    tol = {torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
