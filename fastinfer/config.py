"""Frozen, validated configuration: the model's shape and the engine's knobs."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from fastinfer.models import registry

logger = logging.getLogger("fastinfer")

_DTYPES = ("auto", "float32", "bfloat16", "float16")
DECODE_MODES = ("auto", "eager", "cuda_graph", "compile", "static")  # see EngineConfig.decode_mode
KV_CACHE_DTYPES = ("auto", "int8", "fp8_e4m3")  # EngineConfig.kv_cache_dtype (vLLM's names)
KV_CACHE_DTYPE_ALIASES = {"fp8": "fp8_e4m3"}  # as vLLM
DEFAULT_MODEL = "smollm2-135m"  # the embedded default (fastinfer.models.loader.EMBEDDED_MODELS)


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder, read from an HF ``config.json`` or GGUF metadata. ``architecture`` must be
    registered in :mod:`fastinfer.models.registry` unless ``model_impl`` is "transformers" (the generic path:
    transformers' own modules, for any causal LM it knows); ``hf_config`` keeps the whole source dict so a
    family can read its own extra keys."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"
    model_type: str = ""
    model_impl: str = "fastinfer"  # "fastinfer" (a native class) or "transformers" (the generic path)
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.model_impl not in ("fastinfer", "transformers"):
            raise ValueError(f"model config: model_impl must be 'fastinfer' or 'transformers', got {self.model_impl!r}")
        if self.model_impl == "fastinfer" and not registry.is_supported(self.architecture):
            raise ValueError(f"unsupported architecture {self.architecture!r}; fastinfer supports "
                             f"{', '.join(registry.supported_architectures())}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"model config: {name} must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"model config: num_attention_heads ({self.num_attention_heads}) must be a "
                             f"multiple of num_key_value_heads ({self.num_key_value_heads})")

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], model_impl: str = "auto") -> ModelConfig:
        """Build from the dict of an HF ``config.json``; ``model_impl`` as in :func:`registry.choose_impl`."""
        cfg = _with_key_aliases(cfg)
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if registry.is_supported(a)), archs[0] if archs else
                    f"<model_type={cfg.get('model_type')!r}>")
        impl = registry.choose_impl(arch, model_impl, remote_code=bool(cfg.get("auto_map")))
        if impl == "transformers":
            cfg = {**cfg, **_transformers_keys(cfg)}
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        rope_scaling = cfg.get("rope_scaling")
        rope_theta = cfg.get("rope_theta")
        rope_params = cfg.get("rope_parameters")  # transformers >= 5 nests them here
        if isinstance(rope_params, dict):
            rope_theta = rope_params.get("rope_theta", rope_theta)
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = rope_params
        sliding = cfg.get("sliding_window")
        qwen = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
        if arch in qwen and not cfg.get("use_sliding_window", False):
            sliding = None
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", arch == "Qwen2ForCausalLM")),
            sliding_window=sliding,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            model_type=str(cfg.get("model_type") or ""),
            model_impl=impl,
            hf_config=dict(cfg),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """An HF ``config.json`` dict that :meth:`from_hf_dict` reads back to an equal config."""
        known = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
        eos = list(self.eos_token_ids)
        return {
            **self.hf_config,
            "architectures": [self.architecture], "model_type": self.model_type or known.get(self.architecture, ""),
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling, "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
            "sliding_window": self.sliding_window, "use_sliding_window": self.sliding_window is not None,
            "bos_token_id": self.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "torch_dtype": self.torch_dtype,
        }


# The common sizes under the names some families give them (GPT-2: n_embd, ...; LayerNorm families' epsilon;
# older GPT-NeoX configs' rotary_emb_base); the first alias present fills a missing key.
_KEY_ALIASES = {
    "hidden_size": ("n_embd",), "num_attention_heads": ("n_head",), "num_hidden_layers": ("n_layer",),
    "intermediate_size": ("n_inner",), "max_position_embeddings": ("n_positions",),
    "rms_norm_eps": ("layer_norm_eps", "layer_norm_epsilon"), "rope_theta": ("rotary_emb_base",),
}


def _with_key_aliases(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with every key of :data:`_KEY_ALIASES` that it lacks read from an alias; GPT-2's ``n_inner``
    of null means 4 x hidden."""
    out = dict(cfg)
    for key, aliases in _KEY_ALIASES.items():
        if out.get(key) is None:
            value = next((cfg[a] for a in aliases if cfg.get(a) is not None), None)
            if value is not None:
                out[key] = value
    if out.get("intermediate_size") is None and "n_inner" in cfg and out.get("hidden_size") is not None:
        out["intermediate_size"] = 4 * out["hidden_size"]
    return out


def _transformers_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    """The sizes :class:`ModelConfig` reads, for the generic path, through transformers' own config class of the
    family (its attribute map reads ``n_embd`` as hidden_size, ``n_head`` as num_attention_heads, ...); the FFN
    width and KV heads where a family names them otherwise or not at all. Imports transformers (lazily)."""
    from transformers import AutoConfig

    c = AutoConfig.for_model(str(cfg.get("model_type")), **{k: v for k, v in cfg.items() if k != "model_type"})
    hidden, heads = c.hidden_size, c.num_attention_heads
    ffn = next((v for v in (getattr(c, k, None) for k in ("intermediate_size", "ffn_dim", "n_inner"))
                if isinstance(v, int)), 4 * hidden)
    return {"hidden_size": hidden, "num_attention_heads": heads, "num_hidden_layers": c.num_hidden_layers,
            "vocab_size": c.vocab_size, "intermediate_size": ffn,
            "num_key_value_heads": getattr(c, "num_key_value_heads", None) or heads,
            "max_position_embeddings": getattr(c, "max_position_embeddings", None) or 2048,
            "tie_word_embeddings": bool(getattr(c, "tie_word_embeddings", False))}


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM-shaped speculative decoding settings (``LLM(..., speculative_config={...})``). Every method is
    lossless: greedy output is token-identical to plain decoding, sampled output has exactly the target's
    distribution (rejection sampling with the request's temperature / top-k / top-p / min-p).

    Methods:

    - ``"ngram"``: prompt lookup, no extra model. Proposes up to ``num_speculative_tokens`` tokens that followed
      the latest earlier occurrence of the sequence's last ``prompt_lookup_max``..``prompt_lookup_min`` tokens.
    - ``"draft_model"`` with ``"model": PATH``: a smaller model sharing the target's tokenizer (same vocabulary;
      a clear ``ValueError`` otherwise) drafts ``num_speculative_tokens`` tokens autoregressively from its own
      paged KV cache (same blocks and block tables as the target's). ``"quantization"`` (optional, any value of
      ``LLM(quantization=...)``) quantizes the draft at load.
    - ``"draft_model"`` with ``"model"`` omitted: the quantized self-draft. The target itself, loaded again with
      ``"quantization"`` (default ``"int4"``, group 128; ``"int4-g32"`` for models whose widths 128 does not
      divide; on a GGUF file the file's own Q4 tensors are kept), drafts for itself: a cheap draft with high
      acceptance when no small sibling model exists. ``{"method": "draft_model", "quantization": "int4"}``.

    Adaptive: speculation switches off while more than ``disable_by_batch_size`` requests run (verification
    then costs real compute) and, per request, drafts shrink to one token while its measured acceptance stays
    low. With a draft model and ``cost_aware`` (default), each request instead gets the draft length that
    maximises expected tokens per unit of time given its acceptance and the measured cost of a draft step
    relative to a target step: none while drafting would not pay (a draft every 64 tokens re-measures).
    ``cost_aware=False`` always drafts (the n-gram rule). The draft model's KV cache takes KV memory next to
    the target's (the engine sizes both together)."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    disable_by_batch_size: int = 4
    model: str | None = None
    quantization: str | None = None
    cost_aware: bool = True

    METHODS = ("ngram", "draft_model")

    def __post_init__(self) -> None:
        if self.method not in self.METHODS:
            raise ValueError(f"speculative_config.method {self.method!r} is not supported; supported: "
                             f"{', '.join(self.METHODS)}")
        for name, lo, hi in (("num_speculative_tokens", 1, 16), ("prompt_lookup_max", 1, 64),
                             ("prompt_lookup_min", 1, 64), ("disable_by_batch_size", 1, 1 << 20)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise ValueError(f"speculative_config.{name} must be an integer in [{lo}, {hi}], got {v!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError("speculative_config.prompt_lookup_min must be <= prompt_lookup_max")
        if not isinstance(self.cost_aware, bool):
            raise ValueError(f"speculative_config.cost_aware must be true or false, got {self.cost_aware!r}")
        if self.method == "ngram":
            if self.model is not None or self.quantization is not None:
                raise ValueError("speculative_config: 'model' and 'quantization' belong to method 'draft_model'")
            return
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise ValueError(f"speculative_config.model must be a model path or name, got {self.model!r}")
        from fastinfer.quantization import parse_method

        try:
            parse_method(self.quantization)
        except ValueError as e:
            raise ValueError(f"speculative_config.quantization: {e}") from e

    @property
    def self_draft(self) -> bool:
        """True for the quantized self-draft (``draft_model`` without ``model``)."""
        return self.method == "draft_model" and self.model is None

    @property
    def draft_quantization(self) -> str | None:
        """The quantization the draft model loads with (``int4`` for the self-draft unless given)."""
        if self.self_draft and self.quantization is None:
            return "int4"
        return self.quantization

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpeculativeConfig:
        """Validate a vLLM-style dict (unknown keys raise)."""
        known = {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
                 "disable_by_batch_size", "model", "quantization", "cost_aware"}
        extra = set(d) - known
        if extra:
            raise ValueError(f"unknown speculative_config keys: {sorted(extra)}")
        return cls(**d)


@dataclass(frozen=True)
class EngineConfig:
    """Engine arguments (vLLM names). ``device="auto"`` serves on CUDA when available, else on the CPU. KV
    memory comes from ``kv_cache_memory_bytes`` or ``num_kv_blocks`` when given, else on CUDA from
    ``gpu_memory_utilization`` of the device memory, on CPU from ``max_num_seqs x max_model_len`` tokens capped at
    ``DEFAULT_KV_BYTES``. ``model_impl`` (vLLM's name): "auto" serves an architecture with its native class
    when fastinfer has one, else with transformers' own modules (the generic path); "fastinfer" or
    "transformers" forces one. ``kv_cache_dtype`` (vLLM's names): "auto" keeps K and V in the model dtype;
    "int8" / "fp8_e4m3" ("fp8" is an alias) store them quantized with an fp16 scale per token and KV head
    (about half the bytes of bf16: :func:`fastinfer.ops.reference.quantize_kv_rows`)."""

    model: str
    tokenizer: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    kv_cache_dtype: str = "auto"
    kv_cache_memory_bytes: int | None = None
    num_kv_blocks: int | None = None
    enable_prefix_caching: bool = True
    quantization: str | None = None
    speculative_config: dict[str, Any] | None = None
    tensor_parallel_size: int = 1
    distributed_timeout_s: float = 60.0  # tensor parallelism: a rank silent this long fails the engine
    seed: int = 0
    device: str = "auto"
    gpu_memory_utilization: float = 0.9
    attention_backend: str | None = None
    model_impl: str = "auto"
    enforce_eager: bool = False
    generation_config: str = "auto"  # vLLM's: request defaults from generation_config.json ("vllm": none)
    compilation_config: dict[str, Any] | None = None
    load_progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    DEFAULT_KV_BYTES = 4 << 30

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        for name in ("max_num_seqs", "block_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        kv = KV_CACHE_DTYPE_ALIASES.get(self.kv_cache_dtype, self.kv_cache_dtype)
        if kv not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES} (or 'fp8', an alias of 'fp8_e4m3'), "
                             f"got {self.kv_cache_dtype!r}")
        object.__setattr__(self, "kv_cache_dtype", kv)
        for name in ("max_model_len", "max_num_batched_tokens", "kv_cache_memory_bytes", "num_kv_blocks"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {v!r}")
        dev = self.device
        if not isinstance(dev, str) or not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:")
                                                                                and dev[5:].isdigit())):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {dev!r}")
        g = self.gpu_memory_utilization
        if not isinstance(g, (int, float)) or isinstance(g, bool) or not 0 < g <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {g!r}")
        if self.model_impl not in registry.MODEL_IMPLS:
            raise ValueError(f"model_impl must be one of {registry.MODEL_IMPLS}, got {self.model_impl!r}")
        tp = self.tensor_parallel_size
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {tp!r}")
        t = self.distributed_timeout_s
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not t > 0:
            raise ValueError(f"distributed_timeout_s must be a positive number of seconds, got {t!r}")
        from fastinfer.quantization import parse_method

        parse_method(self.quantization)
        if self.speculative_config is not None:
            spec = SpeculativeConfig.from_dict(dict(self.speculative_config))
            if tp > 1 and spec.method != "ngram":  # every rank proposes the same n-gram drafts (no timing involved)
                raise ValueError(f"speculative_config.method {spec.method!r} is not supported with "
                                 f"tensor_parallel_size > 1 (the draft model does not run on the tensor-parallel "
                                 f"ranks yet); use method 'ngram'")
        if not isinstance(self.generation_config, str) or not self.generation_config:
            raise ValueError(f"generation_config must be 'auto', 'vllm' or a folder, got {self.generation_config!r}")
        if not isinstance(self.enforce_eager, bool):
            raise ValueError(f"enforce_eager must be a bool, got {self.enforce_eager!r}")
        self.decode_mode()  # validates compilation_config
        if self.extra:
            raise TypeError(f"unknown engine arguments: {sorted(self.extra)}")

    def decode_mode(self) -> tuple[str, list[int] | None]:
        """How decode steps run, from ``enforce_eager`` and ``compilation_config`` (vLLM's names): the mode
        ("auto": CUDA graphs on a GPU, eager on the CPU; "eager"; "cuda_graph"; "compile": ``torch.compile`` of
        the padded decode step; "static": the padded step run eagerly) and the ladder of batch sizes
        (``cudagraph_capture_sizes``, None: the default ladder). ``enforce_eager=True`` is "eager"."""
        cc = dict(self.compilation_config or {})
        extra = set(cc) - {"mode", "cudagraph_capture_sizes", "inductor_compile_config"}
        if extra:
            raise ValueError(f"unknown compilation_config keys: {sorted(extra)} (known: mode, "
                             "cudagraph_capture_sizes, inductor_compile_config)")
        ind = cc.get("inductor_compile_config", {})
        if not isinstance(ind, dict) or not all(isinstance(k, str) for k in ind):
            raise ValueError(f"inductor_compile_config must be a dict of inductor options, got {ind!r}")
        mode = cc.get("mode", "auto")
        if mode not in DECODE_MODES:
            raise ValueError(f"compilation_config mode must be one of {DECODE_MODES}, got {mode!r}")
        sizes = cc.get("cudagraph_capture_sizes")
        if sizes is not None and (not isinstance(sizes, (list, tuple)) or not sizes
                                  or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in sizes)):
            raise ValueError(f"cudagraph_capture_sizes must be a non-empty list of positive integers, got {sizes!r}")
        return ("eager" if self.enforce_eager else mode), (list(sizes) if sizes is not None else None)

    def inductor_options(self) -> dict[str, Any]:
        """``compilation_config["inductor_compile_config"]`` (vLLM's name): options for inductor in "compile" mode,
        e.g. ``{"cpp_wrapper": True}`` (the compiled step's op calls from C++, not Python: about 1.7 ms less per
        SmolLM2 int4 step on a 2-core AVX2 CPU, at a C++ compile per rung on a cold cache)."""
        return dict((self.compilation_config or {}).get("inductor_compile_config", {}))


# generation_config.json keys used as request defaults (vLLM's --generation-config auto), by SamplingParams name
GENERATION_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                       "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def generation_defaults(model: str, mode: str) -> dict[str, Any]:
    """Request defaults from ``generation_config.json`` (by SamplingParams name). ``mode``: "auto" (the model
    directory's file), "vllm" (none: built-in defaults) or a directory holding the file."""
    if mode == "vllm":
        return {}
    folder = model if mode == "auto" else mode
    path = os.path.join(folder, "generation_config.json")
    if not os.path.isdir(folder):
        logger.info("generation config: %s is not a model directory (a GGUF file or a short name has no "
                    "generation_config.json); built-in sampling defaults", folder)
        return {}
    if not os.path.isfile(path):
        logger.info("generation config: no %s; built-in sampling defaults", path)
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")
    found = {ours: cfg[theirs] for theirs, ours in GENERATION_DEFAULTS.items() if cfg.get(theirs) is not None}
    logger.info("generation config %s: request defaults %s", path, found or "none")
    return found
