"""Adding an architecture is one class plus one registry entry: a toy family defined here (nothing else touched)
is served through ``LLM`` with prefix caching and n-gram speculation, and matches a plain-torch forward."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastinfer import LLM, SamplingParams
from fastinfer.config import ModelConfig
from fastinfer.layers.linear import Linear
from fastinfer.layers.norm import RMSNorm
from fastinfer.layers.rotary import RotaryEmbedding
from fastinfer.models.interface import LayerKVSpec
from fastinfer.models.registry import register_model, supported_architectures
from fastinfer.ops import OpSet


class ToyForCausalLM(nn.Module):
    """One attention block with a residual, no MLP: embed -> norm -> attention (paged) -> + -> norm -> head."""

    def __init__(self, cfg: ModelConfig, ops: OpSet, dtype: torch.dtype) -> None:
        super().__init__()
        self.config, self.ops = cfg, ops
        h, d, nh, nkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        self.embed = nn.Embedding(cfg.vocab_size, h, dtype=dtype)
        self.norm1 = RMSNorm(h, cfg.rms_norm_eps, ops, dtype)
        self.qkv = Linear(h, (nh + 2 * nkv) * d, dtype=dtype, shard_sizes=(nh * d, nkv * d, nkv * d), ops=ops)
        self.o = Linear(nh * d, h, dtype=dtype, ops=ops)
        self.rotary = RotaryEmbedding(d, cfg.max_position_embeddings, cfg.rope_theta, None, ops)
        self.norm2 = RMSNorm(h, cfg.rms_norm_eps, ops, dtype)
        self.head = Linear(h, cfg.vocab_size, dtype=dtype, ops=ops)
        self.kv_caches: list = []

    def forward(self, input_ids, positions, attn_metadata):
        c = self.config
        t = input_ids.shape[0]
        x = self.embed(input_ids)
        q, k, v = self.qkv(self.norm1(x)).split(self.qkv.shard_sizes, dim=-1)
        q, k = self.rotary(positions, q.view(t, c.num_attention_heads, c.head_dim),
                           k.view(t, c.num_key_value_heads, c.head_dim))
        kc, vc = self.kv_caches[0]
        self.ops.store_kv(k, v.view(t, c.num_key_value_heads, c.head_dim), kc, vc, attn_metadata.slot_mapping)
        o = self.ops.paged_attention(q, kc, vc, attn_metadata, c.head_dim ** -0.5, None)
        return self.norm2(x + self.o(o.reshape(t, -1)))

    def compute_logits(self, hidden):
        return self.head(hidden).float()

    def load_weights(self, weights):
        params = dict(self.named_parameters())
        for name, tensor in weights:
            params[name].data.copy_(tensor)

    def kv_cache_spec(self):
        return [LayerKVSpec(self.config.num_key_value_heads, self.config.head_dim)]

    def bind_kv_cache(self, caches):
        self.kv_caches = caches

    def quantizable_layers(self):
        return {"qkv": self.qkv, "o": self.o}

    def quantize(self, method, group_size=None, lm_head="int8"):
        raise NotImplementedError("the toy model is not quantizable")


def reference_logits(w: dict[str, torch.Tensor], cfg: dict, ids: list[int]) -> torch.Tensor:
    """The toy's math in plain torch over one whole sequence: dense causal attention, no cache."""
    from fastinfer.layers.rotary import inv_frequencies

    nh, nkv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]

    def rms(x, weight):
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg["rms_norm_eps"])

    def rope(x, pos):  # rotate-half
        f = torch.outer(pos.float(), inv_frequencies(d, cfg["rope_theta"], None))
        cos, sin = f.cos()[:, None], f.sin()[:, None]
        x1, x2 = x[..., :d // 2], x[..., d // 2:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    t = len(ids)
    x = w["embed.weight"][torch.tensor(ids)]
    qkv = rms(x, w["norm1.weight"]) @ w["qkv.weight"].T
    q, k, v = qkv.split([nh * d, nkv * d, nkv * d], dim=-1)
    pos = torch.arange(t)
    q, k = rope(q.view(t, nh, d), pos), rope(k.view(t, nkv, d), pos)
    o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.view(t, nkv, d).transpose(0, 1),
                                       is_causal=True, enable_gqa=True)
    x = x + o.transpose(0, 1).reshape(t, -1) @ w["o.weight"].T
    return rms(x, w["norm2.weight"]) @ w["head.weight"].T


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory, smollm2_tokenizer_dir):
    from safetensors.torch import save_file

    cfg = {"architectures": ["ToyForCausalLM"], "model_type": "toy", "vocab_size": 49152, "hidden_size": 64,
           "intermediate_size": 1, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 16, "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
           "eos_token_id": 2, "torch_dtype": "float32"}
    g = torch.Generator().manual_seed(0)
    shapes = {"embed.weight": (49152, 64), "norm1.weight": (64,), "qkv.weight": (128, 64), "o.weight": (64, 64),
              "norm2.weight": (64,), "head.weight": (49152, 64)}
    w = {n: (torch.randn(s, generator=g) * (0.5 if len(s) == 2 else 0.1) + (1.0 if len(s) == 1 else 0.0))
         for n, s in shapes.items()}
    d = tmp_path_factory.mktemp("toy")
    save_file(w, os.path.join(d, "model.safetensors"))
    with open(os.path.join(d, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    for f in os.listdir(smollm2_tokenizer_dir):
        shutil.copy(os.path.join(smollm2_tokenizer_dir, f), d)
    return str(d), w, cfg


def _greedy_reference(w, cfg, ids, n):
    out = list(ids)
    for _ in range(n):
        out.append(int(reference_logits(w, cfg, out)[-1].argmax()))
    return out[len(ids):]


def test_a_toy_architecture_registered_in_test_is_served(toy_dir):
    path, w, cfg = toy_dir
    register_model("ToyForCausalLM", ToyForCausalLM)
    assert "ToyForCausalLM" in supported_architectures()
    prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], list(range(100, 140)), [9, 10, 11] * 12]
    n = 12
    expected = [_greedy_reference(w, cfg, p, n) for p in prompts]
    greedy = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    llm = LLM(path, dtype="float32", max_model_len=256, block_size=8, load_progress=False,
              enable_prefix_caching=True, speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    assert isinstance(llm.engine.worker.model, ToyForCausalLM)
    batched = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], greedy,
                                                            use_tqdm=False)]
    assert batched == expected
    again = [llm.generate({"prompt_token_ids": p}, greedy, use_tqdm=False)[0] for p in prompts]  # prefix hits
    assert [o.outputs[0].token_ids for o in again] == expected
    assert llm.engine.kv.prefix_hits > 0
    assert llm.engine.spec_summary()["draft_tokens"] > 0  # n-gram drafts were proposed and verified
