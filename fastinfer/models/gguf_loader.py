"""Read a GGUF file: model config, tensors (HF names, HF layout) and the tokenizer description.

Parsing uses the ``gguf`` package. Q8_0 / Q4_0 / Q4_1 blocks are dequantized here in torch (bit-exact with
``gguf.dequantize``, several times faster); other quantized types go through ``gguf.dequantize``.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from fastinfer.config import ModelConfig
from fastinfer.quantization.format import QuantizedWeight, pack_int4

_ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


class GGUFFile:
    """An opened, validated GGUF file."""

    def __init__(self, path: str) -> None:
        import gguf

        self.path = path
        try:
            self.reader = gguf.GGUFReader(path)
        except Exception as e:  # the reader raises many kinds of errors on damaged files
            raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
        size = os.path.getsize(path)
        for t in self.reader.tensors:
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size or t.data.nbytes != t.n_bytes:
                raise ValueError(f"{path}: truncated GGUF file: tensor {t.name!r} needs bytes up to {end}, "
                                 f"the file has {size}")
        self.arch = str(self.field("general.architecture"))

    def field(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

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
        vocab = self.field(f"{a}.vocab_size") or len(self.reader.fields["tokenizer.ggml.tokens"].data)
        eos = self.field("tokenizer.ggml.eos_token_id")
        scaling = None
        if self.field(f"{a}.rope.scaling.type") == "linear":
            scaling = {"rope_type": "linear", "factor": float(self.field(f"{a}.rope.scaling.factor"))}
        return ModelConfig(
            architecture=_ARCHS[a],
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
            eos_token_ids=() if eos is None else (int(eos),),
            torch_dtype="float32",
            model_type=a,
        )

    def tensors(self, cfg: ModelConfig, dtype: torch.dtype, keep_quantized: bool = False,
                ) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
        """(HF name, tensor [out, in] in ``dtype``) for every tensor; Q/K rows un-permuted back to HF's
        rotate-half order for llama-arch files (llama.cpp's converter interleaves them).

        ``keep_quantized``: Q8_0 / Q4_0 / Q4_1 projection weights come as :class:`QuantizedWeight` (int8 / int4,
        group 32, the file's own f16 scales: lossless); a quantized tied embedding also yields a quantized
        ``lm_head.weight`` beside its dense copy (the embedding lookup needs float rows)."""
        for t in self.reader.tensors:
            name = hf_name(t.name)
            qw = to_quantized(t) if keep_quantized and (name.endswith("proj.weight") or name == "lm_head.weight"
                                                        or name == "model.embed_tokens.weight") else None
            if qw is not None and name == "model.embed_tokens.weight":
                if cfg.tie_word_embeddings:
                    yield "lm_head.weight", qw
                qw = None
            if qw is not None:
                if self.arch in ("llama", "mistral") and (".q_proj." in name or ".k_proj." in name):
                    n_head = cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads
                    qw = QuantizedWeight(qw.bits, qw.group_size, unpermute_qk(qw.qweight, n_head),
                                         unpermute_qk(qw.scales, n_head),
                                         None if qw.mins is None else unpermute_qk(qw.mins, n_head))
                yield name, qw
                continue
            w = dequantize(t).to(dtype)
            if self.arch in ("llama", "mistral") and (".q_proj." in name or ".k_proj." in name):
                n_head = cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads
                w = unpermute_qk(w, n_head)
            yield name, w

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


def hf_name(gguf_name: str) -> str:
    base, _, kind = gguf_name.rpartition(".")
    parts = base.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{kind}"
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{kind}"
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (per head: interleaved pairs -> two halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _blocks(t: Any, block_bytes: int) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only memmap: we never write to it
        raw = torch.from_numpy(np.asarray(t.data))
    return raw.reshape(-1, block_bytes)  # [n_blocks, block_bytes] uint8


def _f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float()  # [n, 1]


def to_quantized(t: Any) -> QuantizedWeight | None:
    """A Q8_0 / Q4_0 / Q4_1 tensor in our int8 / int4 group-32 format without loss (None for other types):
    the int values and the f16 scales are kept as they are; Q4_0's ``d * (q - 8)`` becomes min ``-8 * d``
    (exact in f16). Dequantizing the result in fp32 equals ``gguf.dequantize`` bit for bit."""
    import gguf

    qt = gguf.GGMLQuantizationType
    kind = t.tensor_type
    if kind not in (qt.Q8_0, qt.Q4_0, qt.Q4_1) or len(t.shape) != 2:
        return None
    k, n = (int(x) for x in t.shape)
    if kind == qt.Q8_0:
        b = _blocks(t, 34)  # [n * k / 32, 34]: f16 d, 32 x int8
        q8 = b[:, 2:].contiguous().view(torch.int8).reshape(n, k)
        return QuantizedWeight(8, 32, q8, b[:, :2].contiguous().view(torch.float16).reshape(n, k // 32), None)
    off = 2 if kind == qt.Q4_0 else 4
    b = _blocks(t, off + 16)
    qs = b[:, off:]  # [nb, 16]: low nibbles are weights 0-15 of the block, high nibbles 16-31
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1).reshape(n, k)  # [N, K] values 0..15
    d = b[:, :2].contiguous().view(torch.float16).reshape(n, k // 32)
    m = (d * -8.0) if kind == qt.Q4_0 else b[:, 2:4].contiguous().view(torch.float16).reshape(n, k // 32)
    return QuantizedWeight(4, 32, pack_int4(q), d, m)


def dequantize(t: Any) -> torch.Tensor:
    """Dequantize one GGUF tensor to fp32 [out, in] (the reverse of GGUF's [in, out] shape)."""
    import gguf

    qt = gguf.GGMLQuantizationType
    shape = tuple(int(x) for x in reversed(t.shape))
    kind = t.tensor_type
    if kind in (qt.F32, qt.F16, qt.BF16):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = torch.from_numpy(np.asarray(t.data))
        if kind == qt.BF16:
            raw = raw.view(torch.bfloat16)
        return raw.reshape(shape).float()
    if kind == qt.Q8_0:
        b = _blocks(t, 34)
        out = b[:, 2:].view(torch.int8).float().mul_(_f16(b[:, :2]))
    elif kind in (qt.Q4_0, qt.Q4_1):
        off = 2 if kind == qt.Q4_0 else 4
        b = _blocks(t, off + 16)
        qs = b[:, off:]
        out = torch.empty(b.shape[0], 2, 16)  # [n, 2, 16]: low nibbles are weights 0-15, high 16-31
        out[:, 0] = qs & 0x0F
        out[:, 1] = qs >> 4
        out = out.view(-1, 32)
        if kind == qt.Q4_0:
            out.sub_(8).mul_(_f16(b[:, :2]))
        else:
            out.mul_(_f16(b[:, :2])).add_(_f16(b[:, 2:4]))
    else:
        out = torch.from_numpy(gguf.dequantize(t.data, kind).astype(np.float32))
    return out.reshape(shape)
