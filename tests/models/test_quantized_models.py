"""Quantized models end to end: lossless GGUF import gives the float model's greedy tokens, quantize -> save ->
reload round trips, and the perplexity gate on real English text (tests/data/python_docs_prose.txt)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastinfer import LLM, SamplingParams
from fastinfer.models.loader import describe_quantization
from tests.models.test_hf_parity import _prefill_logits

# every test here runs the real model for tens of seconds: slow (tests/conftest.py starts slow files first)
pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "Here is a Python function that reverses a string:\n",
    "Once upon a time, in a small village,",
    "The three primary colors are",
]
TEXT = Path(__file__).resolve().parents[1] / "data" / "python_docs_prose.txt"


def _greedy(llm: LLM, n: int = 32) -> list[list[int]]:
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def float_smollm2(smollm2_path):
    return LLM(smollm2_path, dtype="float32", max_model_len=1024, load_progress=False)


@pytest.mark.parametrize("method", ["gguf", "int4"])
def test_lossless_gguf_import_gives_the_float_models_greedy_tokens(smollm2_path, float_smollm2, method):
    q = LLM(smollm2_path, dtype="float32", max_model_len=1024, load_progress=False, quantization=method)
    model = q.engine.worker.model
    assert describe_quantization(model) == "int4 g32 x120, int8 g32 x1"  # Q4_1 layers + the Q8_0 (tied) lm_head
    assert model.embed_tokens.weight.dtype == torch.float32  # lookups stay dense
    assert _greedy(q) == _greedy(float_smollm2)


def test_quantize_cli_saves_and_reloads(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    out = tmp_path / "int4"
    r = subprocess.run([sys.executable, "-m", "fastinfer", "quantize", src, "-q", "int4-g32", "-o", str(out),
                        "--dtype", "float32"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    in_memory = LLM(src, dtype="float32", max_model_len=512, load_progress=False, quantization="int4-g32")
    reloaded = LLM(str(out), dtype="float32", max_model_len=512, load_progress=False)  # quantized by its files
    assert describe_quantization(reloaded.engine.worker.model) == describe_quantization(
        in_memory.engine.worker.model) == "int4 g32 x8, int8 g64 x1"
    assert _greedy(reloaded, 16) == _greedy(in_memory, 16)
    bad = subprocess.run([sys.executable, "-m", "fastinfer", "quantize", src, "-q", "int3", "-o", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "int3" in bad.stderr and "Traceback" not in bad.stderr


def test_quantize_cli_calibrated(tiny_model_dir, tmp_path):
    """``--calibrate`` (rotation + GPTQ + distilled scales) saves a model that reloads quantized, untied, with its
    recipe in config.json, and that stays as close to the float model as round-to-nearest on real text (a wrong
    rotation or tuning step would not: the quality claim itself is the SmolLM2 perplexity gate below; a random
    tiny model has too little structure for GPTQ to gain much)."""
    import json

    from fastinfer.models.loader import load_tokenizer

    src = tiny_model_dir("llama3rope")  # tied embeddings, one KV head
    out = tmp_path / "int4-cal"
    r = subprocess.run([sys.executable, "-m", "fastinfer", "quantize", src, "-q", "int4-g32", "-o", str(out),
                        "--dtype", "bfloat16", "--calibrate", "--tune-steps", "4", "--calibration-tokens", "2048"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    cal = cfg["quantization_config"]["calibration"]
    assert cal["calibration_tokens"] == 2048 and "hadamard 64x64" in cal["rotation"] and cal["tuned"]["steps"] == 4
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:  # calibrated in fp32, float tensors saved in --dtype
        assert f.get_tensor("embed_tokens.weight").dtype == torch.bfloat16
        assert f.get_tensor("layers.0.mlp.down_proj.scales").dtype == torch.float32
    ids = load_tokenizer(src).encode(TEXT.read_text())[:128]

    kw = dict(dtype="float32", max_model_len=512, load_progress=False)
    ref = _prefill_logits(LLM(src, **kw), ids)
    calibrated = LLM(str(out), **kw)
    assert describe_quantization(calibrated.engine.worker.model) == "int4 g32 x8, int8 g64 x1"
    err_cal = float((_prefill_logits(calibrated, ids) - ref).norm() / ref.norm())
    err_rtn = float((_prefill_logits(LLM(src, quantization="int4-g32", **kw), ids) - ref).norm() / ref.norm())
    assert 0 < err_cal < 1.05 * err_rtn, (err_cal, err_rtn)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama3rope"])
def test_int8_tiny_models_stay_close_to_float(tiny_llm, arch):
    """Weight-only int8 (per channel) changes logits by about its rounding error, several times less than int4;
    bias (qwen2) and tied embeddings (llama3rope) go through the quantized path too."""
    ids = list(range(100, 160))
    ref = _prefill_logits(tiny_llm(arch), ids)

    def err(method: str) -> float:
        q = _prefill_logits(tiny_llm(arch, quantization=method), ids)
        return float((q - ref).norm() / ref.norm())

    e8, e4 = err("int8"), err("int4-g32")
    assert 0 < e8 < 0.02 and e8 < e4 / 4, (e8, e4)


@pytest.fixture(scope="module")
def text_ids(smollm2_path):
    from fastinfer.models.loader import load_tokenizer

    ids = load_tokenizer(smollm2_path).encode(TEXT.read_text())
    assert len(ids) >= 5000
    return ids


def _ppl_dtype() -> str:
    """bf16 where the CPU computes it natively (the serving default there), else fp32: an AVX2-only CPU emulates
    bf16 matmuls several times slower than fp32, which made these gates the slowest tests of the suite."""
    from fastinfer.models.loader import cpu_has_native_bf16

    return "bfloat16" if cpu_has_native_bf16() else "float32"


@pytest.fixture(scope="module")
def float_ppl(smollm2_path, text_ids):
    from fastinfer.evaluate import perplexity

    llm = LLM(smollm2_path, dtype=_ppl_dtype(), max_model_len=1024, load_progress=False)
    return perplexity(llm.engine.worker.model, text_ids, window=1024)


def _quantized_ppl(smollm2_path, text_ids, method: str, group_size: int | None = None) -> float:
    from fastinfer.evaluate import perplexity

    llm = LLM(smollm2_path, dtype=_ppl_dtype(), max_model_len=1024, load_progress=False)
    model = llm.engine.worker.model
    model.quantize(method, group_size)  # RTN from the float (dequantized) weights, lm_head int8 per channel
    return perplexity(model, text_ids, window=1024).perplexity


def test_perplexity_gate_int8(smollm2_path, text_ids, float_ppl):
    """Acceptance gate: int8 per-channel within 1% of the float model on >= 5,000 tokens of English."""
    assert float_ppl.num_predicted >= 5000
    ratio = _quantized_ppl(smollm2_path, text_ids, "int8") / float_ppl.perplexity
    assert abs(ratio - 1) < 0.01, ratio


def test_calibration_text_is_disjoint_from_the_test_text():
    from fastinfer.quantization.gptq import default_calibration_text

    calibration = " ".join(default_calibration_text().split())
    paragraphs = [" ".join(p.split()) for p in TEXT.read_text().split("\n\n") if len(p.strip()) > 80]
    assert len(paragraphs) > 40 and len(calibration) > 200_000
    assert not [p for p in paragraphs if p[:60] in calibration]


def test_perplexity_gate_int4_g128_calibrated(smollm2_path, text_ids):
    """Acceptance gate: int4 g128 (g64 where 128 does not divide K = 576) within 5% of the float model, with
    the calibrated recipe (fastinfer.quantization.calibrate: Hadamard rotation, GPTQ, group scales distilled from
    the float model) on CPython docs text disjoint from the test text. Plain RTN misses the gate (see the test
    below). CI runs the recipe at half its shipped budget (8,192 calibration tokens and 12 tuning steps instead
    of 16,384 and 24: +3.8% measured, vs +1.6% for the shipped defaults in benchmarks/RESULTS.md), which halves the
    suite's slowest test (CI's 30-minute budget)."""
    from fastinfer.evaluate import perplexity
    from fastinfer.models.loader import load_tokenizer
    from fastinfer.quantization.calibrate import calibrated_quantize

    # float32 throughout, as `fastinfer quantize --calibrate` runs: the float baseline in the same dtype
    llm = LLM(smollm2_path, dtype="float32", max_model_len=1024, load_progress=False)
    model = llm.engine.worker.model
    float_ppl = perplexity(model, text_ids, window=1024).perplexity
    info = calibrated_quantize(model, load_tokenizer(smollm2_path), "int4", 128, tune_steps=12, num_tokens=8192)
    assert info["tuned"]["steps"] == 12 and info["calibration_tokens"] == 8192
    assert describe_quantization(model) == "int4 g128 x30, int4 g64 x90, int8 g576 x1"  # g64 where K = 576
    ratio = perplexity(model, text_ids, window=1024).perplexity / float_ppl
    assert 1.0 < ratio < 1.05, ratio


def test_perplexity_int4_lossless_and_rtn(smollm2_path, text_ids, float_ppl):
    """int4 group 32 RTN reproduces the file's Q4_1 grid exactly (perplexity unchanged up to bf16 sums), while
    int4 g128 RTN (g64 where 128 does not divide K=576) costs a measured +33% on this 135M model, whose float
    weights are themselves 4-bit: RTN misses the 5% gate, which the calibrated recipe meets (the test above).
    This bounds the RTN loss so a quantizer regression fails."""
    g32 = _quantized_ppl(smollm2_path, text_ids, "int4", 32) / float_ppl.perplexity
    assert abs(g32 - 1) < 0.002, g32
    g128 = _quantized_ppl(smollm2_path, text_ids, "int4", 128) / float_ppl.perplexity
    assert 1.0 < g128 < 1.4, g128


def test_w4a8_keeps_the_files_int4_bits_batches_like_single_and_costs_little_perplexity(smollm2_path, text_ids,
                                                                                     float_ppl):
    """``quantization="w4a8"`` on the Q4_1 file: its int4 tensors and its int8 (Q8_0) head kept and applied with int8
    activations (W4A8 / W8A8); a batch gives each prompt its own greedy tokens (a row's output does not depend on
    the batch); the activation rounding costs under 2% perplexity against the float model (the measured cost is in
    benchmarks/RESULTS.md), and is not zero (the rounding is real)."""
    from fastinfer.evaluate import perplexity

    llm = LLM(smollm2_path, dtype=_ppl_dtype(), quantization="w4a8", max_model_len=1024, load_progress=False)
    assert describe_quantization(llm.engine.worker.model) == "int4 g32 a8 x120, int8 g32 a8 x1"
    batch = _greedy(llm, 16)
    assert batch == [llm.generate(p, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                                  use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]
    ratio = perplexity(llm.engine.worker.model, text_ids, window=1024).perplexity / float_ppl.perplexity
    assert 1.0 < ratio < 1.02, ratio
