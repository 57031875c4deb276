"""The CUDA launchers' host-side argument checks, on the CPU: ``torch.ops.fastinfer.cuda_check_<op>`` runs the very
functions csrc/cuda/bindings_cuda.cpp calls before it launches (csrc/cuda/checks.cpp, in every build), so each bad
input is proven to get its precise ValueError without a GPU. Plus the launch plan of the split-KV attention and
how an install without the CUDA kernels reports itself and refuses a forced ``cuda`` backend."""
from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("fastinfer._C", reason="compiled extension not built (pip install -e . --no-build-isolation)")

from fastinfer.ops.registry import OpSet, compiled_tiers  # noqa: E402

ops = torch.ops.fastinfer
if not hasattr(ops, "cuda_check_paged_attention"):  # a stale in-place build; CI builds afresh
    pytest.skip("fastinfer._C predates the CUDA argument checks: rebuild it (pip install -e . --no-build-isolation)",
                allow_module_level=True)
CUDA_BUILT = compiled_tiers()["cuda"] == "built"


def _misaligned(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A contiguous tensor whose data starts 2 bytes past a 16-byte boundary."""
    n = 1
    for s in shape:
        n *= s
    return torch.zeros(n + 8, dtype=dtype)[1:n + 1].view(shape)


# ------------------------------------------------------------------------------------------- paged_attention


def attention_args(**over):
    """Valid arguments (2 sequences: a decode row and a 2-token chunk; GQA 4; D 64; blocks of 16), overridden."""
    h, hkv, d, dt = over.pop("heads", 8), over.pop("kv_heads", 2), over.pop("head_dim", 64), torch.float16
    args = dict(q=torch.randn(3, h, d).to(dt), k_cache=torch.zeros(10, 16, hkv, d, dtype=dt),
                v_cache=torch.zeros(10, 16, hkv, d, dtype=dt), block_table=torch.zeros(2, 4, dtype=torch.int32),
                seq_lens=torch.tensor([5, 9], dtype=torch.int32),
                query_start_loc=torch.tensor([0, 1, 3], dtype=torch.int32), scale=d ** -0.5, window=0, out=None,
                softcap=0.0)
    args.update(over)
    if args["out"] is None:
        args["out"] = torch.empty_like(args["q"])
    return args


BAD_ATTENTION = {
    "fp32-q": (dict(q=torch.randn(3, 8, 64)), "q must be float16 or bfloat16, got Float"),
    "int8-cache": (dict(k_cache=torch.zeros(10, 16, 2, 66, dtype=torch.int8),
                        v_cache=torch.zeros(10, 16, 2, 66, dtype=torch.int8)), "quantized KV caches"),
    "mixed-dtype": (dict(out=torch.empty(3, 8, 64, dtype=torch.bfloat16)), "must share a dtype"),
    "head-dim-96": (dict(head_dim=96), "head_dim must be 64 or 128, got 96"),
    "cache-head-dim": (dict(k_cache=torch.zeros(10, 16, 2, 128, dtype=torch.float16),
                            v_cache=torch.zeros(10, 16, 2, 128, dtype=torch.float16)),
                       "cache head_dim 128 != q head_dim 64"),
    "heads-not-multiple": (dict(heads=6, kv_heads=4), "num_heads 6 is not a multiple of num_kv_heads 4"),
    "strided-heads": (dict(q=torch.randn(3, 16, 64).half()[:, ::2]), "must have contiguous heads"),
    "strided-dims": (dict(q=torch.randn(3, 8, 128).half()[:, :, ::2]), "unit stride over head_dim"),
    "out-shape": (dict(out=torch.empty(2, 8, 64, dtype=torch.float16)), "must have q's shape"),
    "cache-shapes": (dict(v_cache=torch.zeros(11, 16, 2, 64, dtype=torch.float16)), "must both be [num_blocks"),
    "cache-noncontiguous": (dict(k_cache=torch.zeros(10, 2, 16, 64, dtype=torch.float16).transpose(1, 2),
                                 v_cache=torch.zeros(10, 2, 16, 64, dtype=torch.float16).transpose(1, 2)),
                            "must be contiguous"),
    "cache-misaligned": (dict(k_cache=_misaligned((10, 16, 2, 64), torch.float16)), "16-byte boundary"),
    "block-table-int64": (dict(block_table=torch.zeros(2, 4, dtype=torch.int64)), "block_table must be Int, got Long"),
    "seq-lens-2d": (dict(seq_lens=torch.tensor([[5, 9]], dtype=torch.int32)), "seq_lens must have 1 dims"),
    "qsl-length": (dict(query_start_loc=torch.tensor([0, 3], dtype=torch.int32)),
                   "query_start_loc must have num_seqs + 1 = 3 entries, got 2"),
    "block-table-rows": (dict(block_table=torch.zeros(1, 4, dtype=torch.int32)), "block_table has 1 rows for 2"),
    "negative-window": (dict(window=-1), "window must be >= 0"),
    "negative-softcap": (dict(softcap=-1.0), "softcap must be >= 0"),
    "nan-scale": (dict(scale=float("nan")), "scale must be finite"),
    "group-too-large": (dict(heads=128, kv_heads=1, head_dim=128), "128 query heads per KV head do not fit"),
    "device-mismatch": (dict(block_table=torch.zeros(2, 4, dtype=torch.int32, device="meta")),
                        "block_table is on meta but q is on cpu"),
}


def test_attention_checks_accept_valid_input():
    for over in ({}, dict(head_dim=128), dict(heads=4, kv_heads=4), dict(window=7, softcap=30.0),
                 dict(q=torch.randn(3, 8, 64).to(torch.bfloat16),
                      k_cache=torch.zeros(10, 16, 2, 64, dtype=torch.bfloat16),
                      v_cache=torch.zeros(10, 16, 2, 64, dtype=torch.bfloat16)),
                 dict(q=torch.randn(3, 24, 64).half()[:, :8])):  # a token-strided view of a fused projection
        ops.cuda_check_paged_attention(**attention_args(**over))


@pytest.mark.parametrize("case", BAD_ATTENTION.values(), ids=BAD_ATTENTION.keys())
def test_attention_checks_reject(case):
    over, message = case
    with pytest.raises(ValueError, match=re.escape(message)):
        ops.cuda_check_paged_attention(**attention_args(**over))


@pytest.mark.parametrize("tokens,kv_heads,blocks", [(1, 8, 2048), (4, 2, 300), (64, 8, 64), (4096, 8, 256), (2, 1, 1)])
def test_attention_plan(tokens, kv_heads, blocks):
    """The split plan covers the whole context bound (block_table width x block_size) in chunks of a power-of-two
    partition, splits only while fewer than ~1024 CTAs would run, and needs workspace only with several splits."""
    seqs = tokens
    args = attention_args(q=torch.randn(tokens, 4 * kv_heads, 128).half(), kv_heads=kv_heads, head_dim=128,
                          k_cache=torch.zeros(4, 16, kv_heads, 128, dtype=torch.float16),
                          v_cache=torch.zeros(4, 16, kv_heads, 128, dtype=torch.float16),
                          block_table=torch.zeros(seqs, blocks, dtype=torch.int32),
                          seq_lens=torch.ones(seqs, dtype=torch.int32),
                          query_start_loc=torch.arange(seqs + 1, dtype=torch.int32))
    partition, split_len, splits, workspace = ops.cuda_plan_paged_attention(**args)
    context, ctas = blocks * 16, tokens * kv_heads
    assert partition == 512  # 4 query heads per KV head at D 128 fit the largest chunk
    assert split_len % partition == 0 and (splits - 1) * split_len < context <= splits * split_len
    wanted = min(-(-context // partition), max(1, -(-1024 // ctas)))  # splits for ~1024 CTAs, one chunk at least
    assert wanted / 2 < splits <= wanted
    assert workspace == (tokens * 4 * kv_heads * splits * (128 + 2) if splits > 1 else 0)


# ------------------------------------------------------------------------------------------- store_kv


def store_args(**over):
    dt = torch.bfloat16
    args = dict(key=torch.randn(5, 2, 64).to(dt), value=torch.randn(5, 2, 64).to(dt),
                k_cache=torch.zeros(4, 16, 2, 64, dtype=dt), v_cache=torch.zeros(4, 16, 2, 64, dtype=dt),
                slot_mapping=torch.tensor([0, 3, -1, 17, 63]))
    args.update(over)
    return args


BAD_STORE = {
    "key-dtype": (dict(key=torch.randn(5, 2, 64)), "key and value must have the caches' dtype BFloat16"),
    "key-heads": (dict(key=torch.randn(5, 4, 64).bfloat16(), value=torch.randn(5, 4, 64).bfloat16()),
                  "key and value must be [T, 2, 64]"),
    "slots-int32": (dict(slot_mapping=torch.zeros(5, dtype=torch.int32)), "slot_mapping must be Long, got Int"),
    "slots-length": (dict(slot_mapping=torch.zeros(4, dtype=torch.int64)), "slot_mapping has 4 slots for 5 tokens"),
    "int8-cache": (dict(k_cache=torch.zeros(4, 16, 2, 66, dtype=torch.int8),
                        v_cache=torch.zeros(4, 16, 2, 66, dtype=torch.int8)), "quantized KV caches"),
    "int-cache": (dict(k_cache=torch.zeros(4, 16, 2, 64, dtype=torch.int32),
                       v_cache=torch.zeros(4, 16, 2, 64, dtype=torch.int32)),
                  "k_cache must be float32, float16 or bfloat16"),
    "cache-dtypes": (dict(v_cache=torch.zeros(4, 16, 2, 64, dtype=torch.float16)),
                     "k_cache is BFloat16 but v_cache is Half"),
    "key-strided-dims": (dict(key=torch.randn(5, 2, 128).bfloat16()[:, :, ::2]), "unit stride over head_dim"),
    "device": (dict(slot_mapping=torch.zeros(5, dtype=torch.int64, device="meta")), "slot_mapping is on meta"),
}


def test_store_kv_checks_accept_valid_input():
    ops.cuda_check_store_kv(**store_args())
    fused = torch.randn(5, 8, 64).bfloat16()  # key / value as views of a fused qkv projection
    ops.cuda_check_store_kv(**store_args(key=fused[:, 4:6], value=fused[:, 6:8]))
    ops.cuda_check_store_kv(**store_args(key=torch.randn(5, 2, 64), value=torch.randn(5, 2, 64),
                                         k_cache=torch.zeros(4, 16, 2, 64), v_cache=torch.zeros(4, 16, 2, 64)))


@pytest.mark.parametrize("case", BAD_STORE.values(), ids=BAD_STORE.keys())
def test_store_kv_checks_reject(case):
    over, message = case
    with pytest.raises(ValueError, match=re.escape(message)):
        ops.cuda_check_store_kv(**store_args(**over))


# ------------------------------------------------------------------------------------------- rms_norm


BAD_NORM = {
    "x-1d": (dict(x=torch.randn(64).half()), "x must be 2-D with contiguous rows"),
    "x-strided": (dict(x=torch.randn(4, 128).half()[:, ::2]), "x must be 2-D with contiguous rows"),
    "x-int": (dict(x=torch.zeros(4, 64, dtype=torch.int32)), "x must be float32, float16 or bfloat16, got Int"),
    "weight-size": (dict(weight=torch.ones(32).half()), "weight must be a contiguous [64] tensor of x's dtype"),
    "weight-dtype": (dict(weight=torch.ones(64)), "weight must be a contiguous [64] tensor of x's dtype Half"),
    "residual-shape": (dict(residual=torch.randn(3, 64).half()), "residual Half [3, 64] must match x Half [4, 64]"),
    "residual-dtype": (dict(residual=torch.randn(4, 64)), "must match x"),
    "eps": (dict(eps=-1.0), "eps must be finite and >= 0"),
    "empty-row": (dict(x=torch.randn(4, 0).half(), weight=torch.ones(0).half()), "non-empty last dim"),
}


def norm_args(**over):
    args = dict(x=torch.randn(4, 64).half(), weight=torch.ones(64).half(), eps=1e-6, residual=None)
    args.update(over)
    return args


def test_rms_norm_checks_accept_valid_input():
    ops.cuda_check_rms_norm(**norm_args())
    ops.cuda_check_rms_norm(**norm_args(residual=torch.randn(4, 64).half()))
    ops.cuda_check_rms_norm(**norm_args(x=torch.randn(4, 96).half()[:, :64]))  # strided rows


@pytest.mark.parametrize("case", BAD_NORM.values(), ids=BAD_NORM.keys())
def test_rms_norm_checks_reject(case):
    over, message = case
    with pytest.raises(ValueError, match=re.escape(message)):
        ops.cuda_check_rms_norm(**norm_args(**over))


def test_fused_norm_names_its_op():
    with pytest.raises(ValueError, match="fastinfer::fused_add_rms_norm \\(CUDA\\)"):
        ops.cuda_check_rms_norm(**norm_args(residual=torch.randn(3, 64).half()))


# ------------------------------------------------------------------------------------------- rotary_embedding


def rotary_args(**over):
    qkv = torch.randn(5, 12, 64).bfloat16()  # fused projection: q 8 heads, k 2, v 2
    args = dict(positions=torch.arange(5), q=qkv[:, :8], k=qkv[:, 8:10], cos_sin_cache=torch.randn(32, 64))
    args.update(over)
    return args


BAD_ROTARY = {
    "positions-int32": (dict(positions=torch.arange(5, dtype=torch.int32)), "positions must be Long, got Int"),
    "positions-count": (dict(positions=torch.arange(4)), "4 positions for 5 tokens"),
    "cache-fp16": (dict(cos_sin_cache=torch.randn(32, 64).half()), "cos_sin_cache must be a contiguous float32"),
    "rot-odd": (dict(cos_sin_cache=torch.randn(32, 63)), "rot (cos_sin_cache.size(1)) must be even"),
    "rot-too-big": (dict(cos_sin_cache=torch.randn(32, 128)), "must be even and in (0, 64], got 128"),
    "k-dtype": (dict(k=torch.randn(5, 2, 64)), "k is Float but q is BFloat16"),
    "tokens": (dict(k=torch.randn(4, 2, 64).bfloat16()), "need the same tokens and head_dim"),
    "q-heads-strided": (dict(q=torch.randn(5, 16, 64).bfloat16()[:, ::2]), "q must have contiguous heads"),
}


def test_rotary_checks_accept_valid_input():
    ops.cuda_check_rotary_embedding(**rotary_args())
    ops.cuda_check_rotary_embedding(**rotary_args(cos_sin_cache=torch.randn(32, 32)))  # partial rotary


@pytest.mark.parametrize("case", BAD_ROTARY.values(), ids=BAD_ROTARY.keys())
def test_rotary_checks_reject(case):
    over, message = case
    with pytest.raises(ValueError, match=re.escape(message)):
        ops.cuda_check_rotary_embedding(**rotary_args(**over))


# ------------------------------------------------------------------------------------------- quant_linear


def quant_args(bits=4, **over):
    n, k, g = 48, 256, 64
    qweight = (torch.zeros(n, k // 2, dtype=torch.uint8) if bits == 4 else torch.zeros(n, k, dtype=torch.int8))
    args = dict(x=torch.randn(3, k).half(), qweight=qweight, scales=torch.ones(n, k // g), mins=torch.zeros(n, k // g),
                bits=bits, group_size=g, bias=None)
    args.update(over)
    return args


BAD_QUANT = {
    "x-fp32": (dict(x=torch.randn(3, 256)), "x must be float16 or bfloat16, got Float"),
    "bits-3": (dict(bits=3), "bits must be 4 or 8, got 3"),
    "qweight-dtype": (dict(qweight=torch.zeros(48, 128, dtype=torch.int8)), "qweight must be contiguous uint8"),
    "k-mismatch": (dict(x=torch.randn(3, 192).half()), "does not match K = 192"),
    "group-off-chunk": (dict(group_size=16, scales=torch.ones(48, 16), mins=torch.zeros(48, 16)),
                        "group_size 16 must divide K = 256 and be a multiple of 32"),
    "group-not-dividing": (dict(group_size=96), "group_size 96 must divide K = 256"),
    "scales-shape": (dict(scales=torch.ones(48, 8)), "scales must be contiguous float32 or float16 [48, 4]"),
    "mins-dtype": (dict(mins=torch.zeros(48, 4).half()), "mins must be contiguous with the dtype and shape of scales"),
    "no-mins": (dict(mins=None), "4-bit weights need mins"),
    "bias-shape": (dict(bias=torch.zeros(47)), "bias must be a float [48] tensor"),
    "x-misaligned": (dict(x=_misaligned((3, 256), torch.float16)), "x must start on a 16-byte boundary"),
    "x-row-stride": (dict(x=torch.randn(3, 260).half()[:, :256]), "row stride that is a multiple of 8"),
    "int8-k": (dict(bits=8, x=torch.randn(3, 40).half(), qweight=torch.zeros(48, 40, dtype=torch.int8),
                    scales=torch.ones(48, 1), mins=None, group_size=40), "K = 40 must be a multiple of 16"),
    "device": (dict(scales=torch.ones(48, 4, device="meta")), "scales is on meta but x is on cpu"),
}


def test_quant_checks_accept_valid_input():
    ops.cuda_check_quant_linear(**quant_args())
    ops.cuda_check_quant_linear(**quant_args(bits=8, mins=None, group_size=256, scales=torch.ones(48, 1)))
    ops.cuda_check_quant_linear(**quant_args(scales=torch.ones(48, 4).half(), mins=torch.zeros(48, 4).half(),
                                             bias=torch.zeros(48).half(), x=torch.randn(1, 256).bfloat16()))


@pytest.mark.parametrize("case", BAD_QUANT.values(), ids=BAD_QUANT.keys())
def test_quant_checks_reject(case):
    over, message = dict(case[0]), case[1]
    bits = over.pop("bits", 4)
    with pytest.raises(ValueError, match=re.escape(message)):
        ops.cuda_check_quant_linear(**quant_args(bits, **over))


# ------------------------------------------------------------------------------------------- build report


def test_compiled_tiers_report_matches_the_extension():
    tiers = compiled_tiers()
    assert tiers["cpp"] == "built"
    has_cuda_kernels = torch._C._dispatch_has_kernel_for_dispatch_key("fastinfer::paged_attention", "CUDA")
    assert (tiers["cuda"] == "built") == has_cuda_kernels
    if torch.version.cuda is None:
        assert tiers["cuda"] == "not built (CPU-only torch)"


@pytest.mark.skipif(CUDA_BUILT, reason="the CUDA kernels are built here")
def test_forced_cuda_backend_that_is_not_built_says_so():
    with pytest.raises(RuntimeError, match=r"backend 'cuda' was asked for but .*CUDA kernels: not built"):
        OpSet(device_type="cuda", prefer="cuda")
    auto = OpSet(device_type="cuda")  # automatic choice: cuda skipped with the reason, logged
    assert "cuda" not in auto.chosen.values()
    assert "CUDA kernels: not built" in auto.skipped["cuda"]
