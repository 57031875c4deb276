"""Shared fixtures: tiny random HF models built in-test, the embedded SmolLM2 GGUF, engine factories."""
from __future__ import annotations

import contextlib
import json
import os

# Triton kernels run on CPU through the interpreter when there is no GPU; set before any triton import.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import pytest

TINY_ARCHS = ("llama", "mistral", "qwen2", "llama3rope")


def pytest_configure(config):
    """Split the CPU threads between pytest-xdist workers (2 workers on 2 cores: 1 thread each, not 2 x 2 threads
    contending), and on the controller fetch the embedded models once: the Gemma 3 package assembles its file on
    first use, which two workers must not do at the same time."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        from fastinfer.worker.worker import usable_cpus

        torch.set_num_threads(max(1, usable_cpus() // int(workers)))
    elif getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):  # the controller
        from fastinfer.models.loader import EMBEDDED_MODELS, resolve_model_path

        for name in EMBEDDED_MODELS:
            with contextlib.suppress(ValueError):  # the tests that need it say why
                resolve_model_path(name)


def pytest_collection_modifyitems(config, items):
    # files with a slow test first (order kept otherwise), so under xdist they start at once rather than last
    slow_files = {item.path for item in items if "slow" in item.keywords}
    items.sort(key=lambda item: item.path not in slow_files)
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from fastinfer.models.loader import resolve_model_path

    try:
        return resolve_model_path("smollm2-135m")
    except ValueError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory, smollm2_path) -> str:
    """The SmolLM2 tokenizer saved as HF files, so tiny models can take text prompts."""
    from fastinfer.models.gguf_loader import GGUFFile
    from fastinfer.tokenizer import tokenizer_from_gguf

    d = tmp_path_factory.mktemp("tok")
    tokenizer_from_gguf(GGUFFile(smollm2_path)).save_pretrained(d)
    return str(d)


def _tiny_config(arch: str):
    import transformers

    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if arch == "llama":
        return transformers.LlamaConfig(**common, rope_theta=10000.0)
    if arch == "llama3rope":
        return transformers.LlamaConfig(**{**common, "num_key_value_heads": 1, "tie_word_embeddings": True},
                                        rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 64},
                                        rope_theta=500000.0)
    if arch == "mistral":
        return transformers.MistralConfig(**common, sliding_window=24)
    if arch == "qwen2":
        return transformers.Qwen2Config(**{**common, "num_key_value_heads": 4})
    raise ValueError(arch)


def save_tiny_model(model, d, tokenizer_dir: str) -> str:
    """Save ``model`` (fp32 safetensors) into directory ``d`` beside the tokenizer files of ``tokenizer_dir``."""
    import shutil

    model.save_pretrained(d, safe_serialization=True)
    for f in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, f), d)
    with open(os.path.join(d, "config.json")) as fh:
        assert json.load(fh)["architectures"]
    return str(d)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer_dir):
    """Factory: arch name -> directory with a tiny random HF model (fp32, safetensors) + tokenizer files."""
    import torch
    import transformers

    cache: dict[str, str] = {}

    def make(arch: str = "llama") -> str:
        if arch not in cache:
            torch.manual_seed(0)
            cfg = _tiny_config(arch)
            cls = {"llama": transformers.LlamaForCausalLM, "llama3rope": transformers.LlamaForCausalLM,
                   "mistral": transformers.MistralForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}[arch]
            model = cls(cfg).to(torch.float32)
            with torch.no_grad():  # larger weights than the default init: sharper, less tie-prone logits
                for p in model.parameters():
                    if p.dim() == 2:
                        p.normal_(0, 0.08)
            cache[arch] = save_tiny_model(model, tmp_path_factory.mktemp(f"tiny-{arch}"), smollm2_tokenizer_dir)
        return cache[arch]

    return make


@pytest.fixture(scope="session")
def tiny_llm(tiny_model_dir):
    """Factory for an LLM on a tiny model; small KV pools force preemption when asked."""
    from fastinfer import LLM

    def make(arch: str = "llama", **kw):
        kw.setdefault("load_progress", False)
        kw.setdefault("dtype", "float32")
        kw.setdefault("max_model_len", 512)
        return LLM(tiny_model_dir(arch), **kw)

    return make
