"""The int8/int4 weight format, the RTN and GPTQ quantizers, and lossless GGUF import (fastinfer/quantization/,
fastinfer/models/gguf_loader.py) and the QuantMethod registry."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fastinfer.quantization import (
    QuantizedWeight,
    QuantMethod,
    dequantize,
    fit_group_size,
    get_method,
    pack_int4,
    parse_method,
    quantize,
    quantize_int4,
    quantize_int8,
    register_method,
    resolve_method,
    unpack_int4,
    unregister_method,
)


def test_pack_unpack_roundtrip_and_nibble_order():
    q = torch.randint(0, 16, (5, 34), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (5, 17)
    assert torch.equal(packed[:, 0] & 0x0F, q[:, 0]) and torch.equal(packed[:, 0] >> 4, q[:, 1])
    assert torch.equal(unpack_int4(packed), q)


@pytest.mark.parametrize("g", [None, 32])
def test_int8_rtn_error_is_at_most_half_a_step(g):
    w = torch.randn(37, 96) * torch.logspace(-3, 0, 37).unsqueeze(1)
    qw = quantize_int8(w, g)
    assert qw.bits == 8 and qw.mins is None and qw.group_size == (96 if g is None else g)
    step = qw.scales.repeat_interleave(qw.group_size, dim=1)
    assert ((qw.dequantize() - w).abs() <= step / 2 + 1e-7).all()
    assert qw.qweight.abs().max() <= 127


@pytest.mark.parametrize("g", [32, 64, 128])
def test_int4_rtn_error_is_at_most_half_a_step(g):
    w = torch.randn(19, 256) + torch.linspace(-1, 1, 19).unsqueeze(1)  # groups with one-sided ranges too
    qw = quantize_int4(w, g, search=False)
    assert qw.qweight.dtype == torch.uint8 and qw.qweight.shape == (19, 128)
    step = qw.scales.repeat_interleave(g, dim=1)
    assert ((qw.dequantize() - w).abs() <= step / 2 + 1e-6).all()
    searched = quantize_int4(w, g, search=True)  # the clipping search only ever lowers the squared error
    assert (searched.dequantize() - w).pow(2).sum() <= (qw.dequantize() - w).pow(2).sum() + 1e-6


def test_int4_constant_and_zero_groups_are_exact():
    w = torch.zeros(3, 64)
    w[1] = 0.25
    assert torch.equal(quantize_int4(w, 32).dequantize(), w)
    assert torch.equal(quantize_int8(w).dequantize(), w)


def test_group_size_fallback_and_method_names():
    assert fit_group_size(1536, 128) == 128
    assert fit_group_size(576, 128) == 64  # SmolLM2's hidden size
    assert fit_group_size(96, 128) == 32
    with pytest.raises(ValueError, match="multiple of 32"):
        fit_group_size(100, 128)
    assert quantize(torch.randn(4, 576), "int4").group_size == 64
    assert parse_method("int4") == ("int4", 128) and parse_method("int4-g32") == ("int4", 32)
    assert parse_method(None) == (None, None) and parse_method("gguf") == ("gguf", None)
    for bad in ("int3", "int4-g48", "fp8", ""):
        with pytest.raises(ValueError, match="not supported"):
            parse_method(bad)
    qm, group = resolve_method("int4-g32")
    assert qm is get_method("int4") and group == 32
    assert resolve_method("int4-g32", 64) == (get_method("int4"), 64)  # an explicit group size wins
    assert resolve_method("int8") == (get_method("int8"), None)
    with pytest.raises(ValueError, match="method is required"):
        resolve_method(None)
    with pytest.raises(ValueError, match="not supported"):
        resolve_method("int3")


def test_format_validation_errors():
    with pytest.raises(ValueError, match="bits"):
        QuantizedWeight(3, 32, torch.zeros(2, 32, dtype=torch.int8), torch.ones(2, 1), None)
    with pytest.raises(ValueError, match="uint8"):
        QuantizedWeight(4, 32, torch.zeros(2, 16, dtype=torch.int8), torch.ones(2, 1), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="scales"):
        QuantizedWeight(8, 32, torch.zeros(2, 64, dtype=torch.int8), torch.ones(2, 3), None)
    with pytest.raises(ValueError, match="mins"):
        QuantizedWeight(4, 32, torch.zeros(2, 16, dtype=torch.uint8), torch.ones(2, 1), None)


def _fake_gguf_tensor(kind, w: np.ndarray):
    import gguf

    data = gguf.quants.quantize(w, kind)  # [N, bytes per row] uint8
    return SimpleNamespace(tensor_type=kind, shape=[w.shape[1], w.shape[0]], data=data, n_bytes=data.nbytes,
                           name="blk.0.ffn_up.weight")


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_blocks_import_bit_exact(kind):
    import gguf

    from fastinfer.models.gguf_loader import to_quantized

    qt = getattr(gguf.GGMLQuantizationType, kind)
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((24, 96)) * rng.uniform(0.01, 3, (24, 1))).astype(np.float32)
    t = _fake_gguf_tensor(qt, w)
    qw = to_quantized(t)
    assert qw is not None and qw.group_size == 32 and qw.bits == (8 if kind == "Q8_0" else 4)
    assert qw.scales.dtype == torch.float16  # the file's own scales, kept
    ref = gguf.quants.dequantize(t.data, qt).reshape(24, 96).astype(np.float32)
    ours = qw.dequantize().numpy()
    if kind == "Q4_0":  # d * (q - 8) with d < 0 and q = 8 is -0.0 in gguf, q * d + (-8 d) is +0.0 here
        assert np.array_equal(ours, ref)  # equal values (and equal bits everywhere else)
        nonzero = ref != 0
        assert np.array_equal(ours[nonzero].view(np.int32), ref[nonzero].view(np.int32))
    else:
        assert np.array_equal(ours.view(np.int32), ref.view(np.int32))


def test_smollm2_gguf_tensors_import_bit_exact(smollm2_path):
    import gguf

    from fastinfer.models.gguf_loader import GGUFFile, to_quantized

    g = GGUFFile(smollm2_path)
    kinds = set()
    for t in g.reader.tensors:
        qw = to_quantized(t)
        if qw is None:
            continue
        kinds.add(t.tensor_type.name)
        ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(qw.shape).astype(np.float32)
        assert np.array_equal(qw.dequantize().numpy().view(np.int32), ref.view(np.int32)), t.name
    assert kinds == {"Q4_1", "Q8_0"}


def test_gptq_beats_rtn_on_correlated_inputs():
    from fastinfer.quantization.gptq import gptq_quantize

    torch.manual_seed(0)
    k, n, t = 128, 48, 2048
    mix = torch.randn(k, k) / k ** 0.5 + torch.eye(k)
    x = torch.randn(t, k) @ mix * torch.linspace(0.2, 3, k)  # correlated inputs of unequal scale
    w = torch.randn(n, k)
    h = x.T @ x / t
    for bits, g in ((4, 32), (4, 128), (8, k)):
        rtn = quantize_int4(w, g) if bits == 4 else quantize_int8(w)
        gp = gptq_quantize(w, h, bits, g)
        assert gp.bits == bits and gp.group_size == g
        err_rtn = (x @ (rtn.dequantize() - w).T).pow(2).mean()
        err_gptq = (x @ (gp.dequantize() - w).T).pow(2).mean()
        assert err_gptq < 0.8 * err_rtn, (bits, g, float(err_gptq), float(err_rtn))
        # the stored values are plain group-wise: same format as RTN output
        assert torch.equal(dequantize(gp.qweight, gp.scales, gp.mins, bits, g), gp.dequantize())


def test_parsing_a_method_imports_no_torch():
    """``fastinfer.config`` validates ``quantization=`` with the method registry; neither imports torch."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from fastinfer.quantization import parse_method\n"
            "assert parse_method('int4-g64') == ('int4', 64) and parse_method('gguf') == ('gguf', None)\n"
            "from fastinfer.config import EngineConfig\n"
            "EngineConfig('some-model', quantization='int4-g32')\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'triton'))\n"
            "assert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


class _ToyMethod(QuantMethod):
    """int8 per-channel weights applied by dequantizing in Python: a method the engine has never heard of."""

    name = "toy"
    bits = 8

    def __init__(self) -> None:
        self.calls = 0

    def group_size(self, in_features, requested=None):
        return in_features

    def quantize_weight(self, w, group_size=None):
        return quantize_int8(w)

    def apply(self, layer, x):
        self.calls += 1
        return torch.nn.functional.linear(x, layer.quant.dequantize().to(x.dtype), layer.bias)

    def describe(self, qw):
        return "toy"


def test_a_registered_method_is_parsed_created_and_applied(tiny_llm):
    from fastinfer.models.loader import describe_quantization
    from tests.models.test_hf_parity import _prefill_logits

    toy = _ToyMethod()
    register_method("toy", toy)
    try:
        assert parse_method("toy") == ("toy", None) and get_method("toy") is toy
        with pytest.raises(ValueError, match="toy"):  # the error lists every registered spelling
            parse_method("int3")
        llm = tiny_llm("llama", quantization="toy")  # engine config, loader and Linear all go through it
        model = llm.engine.worker.model
        assert describe_quantization(model) == "int8 g64 x1, toy x8"  # the lm_head keeps its int8 default
        assert all(m.quant_method is toy for n, m in model.quantizable_layers().items() if n != "lm_head")
        ids = list(range(100, 140))
        logits = _prefill_logits(llm, ids)
        assert toy.calls >= 8
        ref = _prefill_logits(tiny_llm("llama", quantization="int8"), ids)  # same weights, the kernel applies them
        torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-3)
    finally:
        unregister_method("toy")
    with pytest.raises(ValueError, match="not supported"):
        parse_method("toy")


def test_quantization_reaches_models_only_through_the_protocol():
    """Quantization, calibration, rotation and evaluation name no model class and no family's module layout:
    they use the CausalLM protocol (quantizable_layers, rotation_plan, forward) only."""
    import re
    from pathlib import Path

    import fastinfer

    root = Path(fastinfer.__file__).parent
    files = [*sorted((root / "quantization").glob("*.py")), root / "evaluate.py"]
    pattern = re.compile(r"Llama|Mistral|Qwen|models\.llama|self_attn|\.mlp\b|embed_tokens|dense_forward")
    offenders = {f.name: pattern.findall(f.read_text()) for f in files if pattern.search(f.read_text())}
    assert len(files) >= 10 and not offenders, offenders
