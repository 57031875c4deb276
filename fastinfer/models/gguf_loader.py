"""Read a GGUF file: model config, tensors (HF names, HF layout) and the tokenizer description.

Parsing uses the ``gguf`` package; the quantized blocks are decoded in torch by
:mod:`fastinfer.models.gguf_quants` (bit-exact with ``gguf.quants.dequantize``).
"""
from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch

from fastinfer.config import ModelConfig
from fastinfer.distributed.parallel_state import tp_rank, tp_size
from fastinfer.models.gguf_quants import dequantize, to_quantized
from fastinfer.models.gguf_reader import GGUFReader, GGUFSlice
from fastinfer.quantization.format import QuantizedExperts, QuantizedWeight

logger = logging.getLogger("fastinfer.models")

__all__ = ["GGUFFile", "dequantize", "hf_name", "to_quantized", "unpermute_qk"]

_ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
          "gemma3": "Gemma3ForCausalLM", "qwen2moe": "Qwen2MoeForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM",
          "olmoe": "OlmoeForCausalLM"}  # "llama" with experts (llama.expert_count > 0): MixtralForCausalLM
_MOE_ARCHS = ("qwen2moe", "qwen3moe", "olmoe")
_HF_MODEL_TYPES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}  # where HF's model_type differs
_RENORMALIZE = {"llama": True, "qwen2moe": False, "qwen3moe": True, "olmoe": False}  # llama.cpp's MoE graphs
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    # MoE: the router, the experts stacked ([E, N, K]), Qwen2-MoE's shared expert and its sigmoid gate
    "ffn_gate_inp": "mlp.gate", "ffn_gate_exps": "mlp.experts.gate_proj", "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj", "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
_PER_EXPERT = {"ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"}  # older files: blk.N.ffn_gate.E
_GEMMA_LAYER_NAMES = {  # Gemma's four norms per layer
    **_LAYER_NAMES, "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_ARCH_LAYER_NAMES = {"gemma3": _GEMMA_LAYER_NAMES}
_SPLIT_TOP = ("model.embed_tokens.weight", "lm_head.weight")  # split by vocabulary under tensor parallelism
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


class GGUFFile:
    """An opened, validated GGUF file."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.reader = GGUFReader(path)
        except (ValueError, OSError) as e:
            raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
        size = os.path.getsize(path)
        for t in self.reader.tensors:
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size or t.data.nbytes != t.n_bytes:
                raise ValueError(f"{path}: truncated GGUF file: tensor {t.name!r} needs bytes up to {end}, "
                                 f"the file has {size}")
        self.arch = str(self.field("general.architecture"))

    def field(self, key: str, default: Any = None) -> Any:
        return self.reader.fields.get(key, default)

    def model_config(self) -> ModelConfig:
        a = self.arch
        if a not in _ARCHS:
            raise ValueError(f"GGUF architecture {a!r} is not supported; supported: {', '.join(_ARCHS)}")
        names = {t.name for t in self.reader.tensors}
        if "rope_freqs.weight" in names:
            raise ValueError("GGUF files with a rope_freqs tensor (Llama 3.1 long-context scaling) are not "
                             "supported yet")
        heads = int(self.field(f"{a}.attention.head_count"))
        hidden = int(self.field(f"{a}.embedding_length"))
        vocab = self.field(f"{a}.vocab_size") or len(self.field("tokenizer.ggml.tokens", ()))
        eos = self.field("tokenizer.ggml.eos_token_id")
        eos_ids = () if eos is None else (int(eos),)
        if a == "gemma3" and "<end_of_turn>" in (tokens := self.field("tokenizer.ggml.tokens", [])):
            eos_ids += (tokens.index("<end_of_turn>"),)  # a chat turn's end (llama.cpp: an end-of-generation token)
        scaling = None
        if self.field(f"{a}.rope.scaling.type") == "linear":
            scaling = {"rope_type": "linear", "factor": float(self.field(f"{a}.rope.scaling.factor"))}
        moe = a in _MOE_ARCHS or (a == "llama" and bool(self.field("llama.expert_count")))
        hf_config = self._gemma3_keys() if a == "gemma3" else self._moe_keys(names) if moe else {}
        return ModelConfig(
            architecture="MixtralForCausalLM" if moe and a == "llama" else _ARCHS[a],
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(self.field(f"{a}.feed_forward_length")),
            num_hidden_layers=int(self.field(f"{a}.block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(self.field(f"{a}.attention.head_count_kv", heads)),
            head_dim=int(self.field(f"{a}.attention.key_length", hidden // heads)),
            rms_norm_eps=float(self.field(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(self.field(f"{a}.rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=int(self.field(f"{a}.context_length", 2048)),
            tie_word_embeddings="output.weight" not in names,
            attention_bias="blk.0.attn_q.bias" in names,
            sliding_window=self.field(f"{a}.attention.sliding_window"),
            bos_token_id=self.field("tokenizer.ggml.bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype="float32",
            model_type="mixtral" if moe and a == "llama" else _HF_MODEL_TYPES.get(a, a),
            hf_config=hf_config,
        )

    def _moe_keys(self, names: set[str]) -> dict[str, Any]:
        """The HF config keys the MoE models read, from llama.cpp's: ``expert_count``, ``expert_used_count``, the
        experts' FFN size (Qwen: ``expert_feed_forward_length``, else ``feed_forward_length / expert_used_count`` as
        llama.cpp falls back; Mixtral, OLMoE: ``feed_forward_length``), Qwen2-MoE's shared expert where the file
        has its tensors, top-k renormalisation as llama.cpp's graph for the architecture fixes it (Mixtral,
        Qwen3-MoE: yes; Qwen2-MoE, OLMoE: no), dense MLP layers where a layer has no router. OLMoE's ``clip_qkv``
        has no GGUF key (llama.cpp does not clip). ValueError for MoE variants the native models cannot serve."""
        a = self.arch
        n, k = int(self.field(f"{a}.expert_count") or 0), int(self.field(f"{a}.expert_used_count") or 0)
        if not 1 <= k <= n:
            raise ValueError(f"{self.path}: a {a} MoE file needs {a}.expert_count >= 1 and 1 <= "
                             f"{a}.expert_used_count <= expert_count, got {n} and {k}")
        gating = self.field(f"{a}.expert_gating_func")
        if gating not in (None, 1):  # gguf.ExpertGatingFuncType.SOFTMAX
            raise ValueError(f"{self.path}: {a}.expert_gating_func = {gating} (sigmoid routing) is not supported: the "
                             "MoE models route by softmax")
        if float(self.field(f"{a}.expert_weights_scale") or 1.0) != 1.0:
            raise ValueError(f"{self.path}: {a}.expert_weights_scale = {self.field(f'{a}.expert_weights_scale')} "
                             "(scaled routing weights) is not supported")
        blocks, ff = int(self.field(f"{a}.block_count")), int(self.field(f"{a}.feed_forward_length"))
        shared = any(f"blk.{i}.ffn_gate_shexp.weight" in names for i in range(blocks))
        if shared and a != "qwen2moe":
            raise ValueError(f"{self.path}: shared experts in a {a} file are not supported (qwen2moe files only)")
        keys: dict[str, Any] = {
            "num_local_experts" if a == "llama" else "num_experts": n, "num_experts_per_tok": k,
            "norm_topk_prob": _RENORMALIZE[a], "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i in range(blocks) if f"blk.{i}.ffn_gate_inp.weight" not in names]}
        if a in ("qwen2moe", "qwen3moe"):
            keys["moe_intermediate_size"] = int(self.field(f"{a}.expert_feed_forward_length") or ff // k)
        if a == "qwen2moe":
            keys["qkv_bias"] = "blk.0.attn_q.bias" in names
        if shared:
            keys["shared_expert_intermediate_size"] = int(self.field(f"{a}.expert_shared_feed_forward_length") or ff)
        return keys

    def _gemma3_keys(self) -> dict[str, Any]:
        """The HF config keys Gemma 3 reads beyond the common ones, as llama.cpp fixes them for this architecture
        (the file does not store them): every 6th layer global, the sliding layers' RoPE base 10000 (the
        global layers': ``rope.freq_base``, with the file's linear scaling), attention scale ``1 / sqrt(head_dim)``
        (``1 / sqrt(hidden / heads)`` for the 27B, 62 layers), GELU-tanh, no soft-capping."""
        a, n = self.arch, int(self.field(f"{self.arch}.block_count"))
        heads, hidden = int(self.field(f"{a}.attention.head_count")), int(self.field(f"{a}.embedding_length"))
        every = int(self.field(f"{a}.attention.sliding_window_pattern", 6))
        full: dict[str, Any] = {"rope_type": "default", "rope_theta": float(self.field(f"{a}.rope.freq_base", 1e6))}
        if self.field(f"{a}.rope.scaling.type") == "linear":
            full.update(rope_type="linear", factor=float(self.field(f"{a}.rope.scaling.factor")))
        return {
            "layer_types": ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)],
            "sliding_window": self.field(f"{a}.attention.sliding_window"),
            "rope_parameters": {"full_attention": full,
                                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
            "query_pre_attn_scalar": hidden // heads if n == 62 else int(self.field(f"{a}.attention.key_length")),
            "hidden_activation": "gelu_pytorch_tanh",
            "final_logit_softcapping": None,
            "attn_logit_softcapping": None,
        }

    def tensors(self, cfg: ModelConfig, dtype: torch.dtype, keep_quantized: bool = False, lazy: bool = False,
                ) -> Iterator[tuple[str, Any]]:
        """(HF name, tensor [out, in] in ``dtype``) for every tensor; Q/K rows un-permuted back to HF's
        rotate-half order for llama-arch files (llama.cpp's converter interleaves them; Mixtral's too, not the
        Qwen-MoE / OLMoE ones). A MoE layer's stacked experts (``ffn_{gate,up,down}_exps``) come as one [E, N, K]
        tensor each, under the stacked HF names (``mlp.experts.gate_proj.weight``...).

        ``keep_quantized``: quantized projection weights come as :class:`QuantizedWeight` (lossless; int4 g32
        for Q4_0 / Q4_1 / Q4_K, int8 for the other types, see :func:`~fastinfer.models.gguf_quants.to_quantized`),
        stacked experts as :class:`QuantizedExperts`; a quantized tied embedding also yields a quantized
        ``lm_head.weight`` beside its dense copy (the embedding lookup needs float rows).

        ``lazy`` (tensor parallelism): the projections, the embedding and the lm_head come as
        :class:`~fastinfer.models.gguf_reader.GGUFSlice` s, so a rank dequantizes (or converts) only the rows /
        columns it keeps; the load log says how many of their bytes this rank read. (With ``keep_quantized``
        the tied lm_head's codes are converted whole, then narrowed.)"""
        read = [0]
        total = 0
        for t in self.reader.tensors:
            name = hf_name(t.name, self.arch)
            if keep_quantized and name == "model.embed_tokens.weight" and cfg.tie_word_embeddings:
                qw = to_quantized(t)
                if isinstance(qw, QuantizedWeight):
                    yield "lm_head.weight", qw
            if lazy and len(t.shape) == 2 and (name.endswith("proj.weight") or name in _SPLIT_TOP):
                total += int(t.n_bytes)
                yield name, GGUFSlice(t, functools.partial(self._convert, name, cfg, dtype, keep_quantized,
                                                           int(t.shape[1])), read)
                continue
            yield name, self._convert(name, cfg, dtype, keep_quantized, None, t)
        if lazy:
            logger.info("GGUF %s: rank %d of %d read %.1f of %.1f MiB of the split weights (%.3f)",
                        os.path.basename(self.path), tp_rank(), tp_size(), read[0] / 2**20, total / 2**20,
                        read[0] / max(total, 1))

    def _convert(self, name: str, cfg: ModelConfig, dtype: torch.dtype, keep_quantized: bool, full_rows: int | None,
                 t: Any) -> torch.Tensor | QuantizedWeight | QuantizedExperts:
        """One tensor (or a :class:`GGUFSlice` region of one: ``full_rows`` the whole tensor's rows, its Q/K rows
        cut on head boundaries) as :meth:`tensors` yields it."""
        n_head = None
        if self.arch in ("llama", "mistral") and (".q_proj." in name or ".k_proj." in name):
            n_head = cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads
            if full_rows is not None:
                n_head = n_head * int(t.shape[1]) // full_rows
        if keep_quantized and (name.endswith("proj.weight") or name == "lm_head.weight"):
            qw = to_quantized(t)
            if isinstance(qw, QuantizedWeight) and n_head is not None:
                qw = QuantizedWeight(qw.bits, qw.group_size, unpermute_qk(qw.qweight, n_head),
                                     unpermute_qk(qw.scales, n_head),
                                     None if qw.mins is None else unpermute_qk(qw.mins, n_head))
            if qw is not None:
                return qw
        w = dequantize(t)
        if self.arch == "gemma3" and name.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp stores Gemma's (1 + w) norm weights with the 1 added; HF's hold w
        if name.endswith(".shared_expert_gate.weight"):
            w = w.reshape(1, -1)  # Qwen2-MoE's [1, H] shared-expert gate, a vector [H] in llama.cpp's files
        w = w.to(dtype)
        return w if n_head is None else unpermute_qk(w, n_head)

    def tokenizer_description(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(tokenizer dict, tokenizer config) in the shape transformers' GGUF converter takes."""
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING

        tok: dict[str, Any] = {}
        conf: dict[str, Any] = {}
        for group, out in (("tokenizer", tok), ("tokenizer_config", conf)):
            for key, name in GGUF_TOKENIZER_MAPPING[group].items():
                v = self.field(f"tokenizer.{key}")
                if v is not None:
                    out[name] = v
        if tok.get("tokenizer_type") == "llama":
            conf.setdefault("add_bos_token", True)
        for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                          ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
            tid = self.field(f"tokenizer.ggml.{key}")
            conf[name] = tok["tokens"][tid] if tid is not None else None
        return tok, conf


def hf_name(gguf_name: str, arch: str = "llama") -> str:
    """The HF checkpoint name of a GGUF tensor name (``blk.0.attn_q.weight`` -> ``model.layers.0.self_attn.
    q_proj.weight``) for architecture ``arch``; ValueError for names it does not know."""
    base, _, kind = gguf_name.rpartition(".")
    parts = base.split(".")
    layer_names = _ARCH_LAYER_NAMES.get(arch, _LAYER_NAMES)
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in layer_names:
        return f"model.layers.{parts[1]}.{layer_names[parts[2]]}.{kind}"
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _PER_EXPERT and parts[3].isdigit():
        return f"model.layers.{parts[1]}.mlp.experts.{parts[3]}.{_PER_EXPERT[parts[2]]}.{kind}"
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{kind}"
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (per head: interleaved pairs -> two halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
