"""GGML block types decoded in torch (fastinfer.models.gguf_quants) against the gguf package's reference
dequantization, bit for bit, and their lossless import into the weight-only format."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from fastinfer.layers.linear import concat_rows  # noqa: E402
from fastinfer.models.gguf_quants import dequantize, to_quantized  # noqa: E402

# type -> byte offsets of its f16 fields (scales, mins) inside a block: random bytes there could be NaN / inf
F16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q2_K": (80, 82),
              "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
QUANTIZABLE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # gguf.quants.quantize implements these
ROWS = 7  # odd


def _tensor(kind: str, data: np.ndarray, k: int) -> SimpleNamespace:
    """The slice of gguf.ReaderTensor the decoders read ([K, N] shape, raw bytes)."""
    return SimpleNamespace(tensor_type=gguf.GGMLQuantizationType[kind], shape=[k, data.shape[0]], data=data,
                           name=f"test.{kind}")


def _random_blocks(kind: str, rows: int, blocks_per_row: int = 3, seed: int = 0) -> tuple[np.ndarray, int]:
    """Random bytes for ``rows`` rows of blocks, with finite f16 scales of both signs; (data, K)."""
    block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (rows, blocks_per_row * nbytes), dtype=np.uint8)
    blocks = data.reshape(-1, nbytes)
    for off in F16_FIELDS[kind]:
        f = rng.uniform(-3, 3, (blocks.shape[0], 1)) * 10.0 ** rng.integers(-6, 2, (blocks.shape[0], 1))
        blocks[:, off:off + 2] = f.astype(np.float16).view(np.uint8)
    return data, blocks_per_row * block


def _quantized_blocks(kind: str, rows: int) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((rows, 96)) * rng.uniform(0.01, 3, (rows, 1))).astype(np.float32)
    return gguf.quants.quantize(w, gguf.GGMLQuantizationType[kind]), 96


def _cases():
    for kind in F16_FIELDS:
        yield kind, "random"
        if kind in QUANTIZABLE:
            yield kind, "quantized"


def _reference(t: SimpleNamespace, rows: int, k: int) -> np.ndarray:
    return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(rows, k)


@pytest.mark.parametrize("kind,source", list(_cases()))
def test_dequantize_is_bit_exact(kind, source):
    data, k = _random_blocks(kind, ROWS) if source == "random" else _quantized_blocks(kind, ROWS)
    t = _tensor(kind, data, k)
    ours = dequantize(t)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == (ROWS, k)
    assert ours.numpy().tobytes() == _reference(t, ROWS, k).tobytes()


@pytest.mark.parametrize("kind,source", list(_cases()))
def test_import_is_lossless(kind, source):
    data, k = _random_blocks(kind, ROWS) if source == "random" else _quantized_blocks(kind, ROWS)
    t = _tensor(kind, data, k)
    qw = to_quantized(t)
    assert qw is not None and qw.shape == (ROWS, k)
    want_bits = 4 if kind in ("Q4_0", "Q4_1", "Q4_K") else 8
    want_group = 16 if kind in ("Q2_K", "Q3_K", "Q6_K") else 32
    assert (qw.bits, qw.group_size) == (want_bits, want_group)
    assert qw.scales.dtype == (torch.float32 if kind.endswith("_K") else torch.float16)
    ref = _reference(t, ROWS, k)
    ours = qw.dequantize().numpy()
    assert np.array_equal(ours, ref)
    if kind == "Q4_0":  # d * (q - 8) is -0.0 in gguf where q = 8 and d < 0; q * d + (-8 d) is +0.0 here
        ref, ours = ref[ref != 0], ours[ref != 0]
    assert ours.tobytes() == ref.tobytes()


def test_types_without_a_decoder_fall_back_to_gguf_logged(caplog):
    data = np.random.default_rng(2).integers(0, 256, (3, 2 * 18), dtype=np.uint8)  # IQ4_NL: f16 d + 16 bytes
    data.reshape(-1, 18)[:, :2] = np.array([0.5], dtype=np.float16).view(np.uint8)
    t = _tensor("IQ4_NL", data, 64)
    assert to_quantized(t) is None  # not imported: the loader keeps it float
    with caplog.at_level(logging.WARNING, logger="fastinfer"):
        ours = dequantize(t)
    assert "IQ4_NL" in caplog.text and "gguf package" in caplog.text
    assert ours.numpy().tobytes() == _reference(t, 3, 64).tobytes()


def test_unreadable_type_is_a_clear_error():
    t = _tensor("Q8_K", np.zeros((2, 292), dtype=np.uint8), 256)  # no dequantization anywhere (activations)
    with pytest.raises(ValueError, match="Q8_K cannot be dequantized"):
        dequantize(t)


def _imported(kind: str, rows: int, k: int, seed: int):
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][0]
    data, k = _random_blocks(kind, rows, k // block, seed)
    return to_quantized(_tensor(kind, data, k))


@pytest.mark.parametrize("kinds,want", [
    (("Q4_K", "Q4_K", "Q6_K"), (8, 16, torch.float32)),  # a Q4_K_M file's q, k, v
    (("Q5_0", "Q5_0", "Q8_0"), (8, 32, torch.float16)),  # Gemma 3's Q4_K_M: one format already
    (("Q4_1", "Q5_0"), (8, 32, torch.float16)),
    (("Q4_0", "Q4_K"), (4, 32, torch.float32)),
])
def test_fused_projection_of_mixed_types_is_widened_losslessly(kinds, want):
    parts = [_imported(kind, 3 + i, 512, seed=i) for i, kind in enumerate(kinds)]
    fused = concat_rows(parts)
    assert (fused.bits, fused.group_size, fused.scales.dtype) == want
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))
