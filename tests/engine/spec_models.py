"""Model builders for the draft-model speculation tests: a perturbed copy of a tiny target (a draft that agrees
with it often but not always) and a small-vocabulary target/draft pair for distribution tests."""
from __future__ import annotations

import json
import os
import shutil

import torch


def perturbed_copy(target_dir: str, out_dir: str, noise: float = 0.05, seed: int = 1) -> str:
    """``target_dir``'s model with every matrix perturbed by ``noise`` x its std (same tokenizer files)."""
    from safetensors.torch import load_file, save_file

    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(target_dir):
        if not f.endswith(".safetensors"):
            shutil.copy(os.path.join(target_dir, f), out_dir)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, t in load_file(os.path.join(target_dir, "model.safetensors")).items():
        if t.dim() == 2:
            t = t + noise * t.std() * torch.randn(t.shape, generator=g)
        tensors[name] = t.contiguous()
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    return out_dir


SMALL_VOCAB = 6


def small_vocab_model(out_dir: str, seed: int, num_layers: int = 2, hidden: int = 32, scale: float = 0.5) -> str:
    """A tiny random Llama over ``SMALL_VOCAB`` tokens (word-level tokenizer "t0".."t5"), fp32 safetensors."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = transformers.LlamaConfig(vocab_size=SMALL_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                                   tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, scale)
    model.save_pretrained(out_dir, safe_serialization=True)
    vocab = {f"t{i}": i for i in range(SMALL_VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t0",
                                                eos_token="t1")
    fast.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "config.json")) as fh:
        assert json.load(fh)["vocab_size"] == SMALL_VOCAB
    return out_dir


def chi2(counts: torch.Tensor, expected: torch.Tensor, n: int) -> tuple[float, int]:
    """Pearson statistic and degrees of freedom, cells expecting < 5 pooled; infinite for an impossible one."""
    if counts[expected == 0].sum() > 0:
        return float("inf"), 0
    small = expected * n < 5
    e = torch.cat([expected[~small] * n, (expected[small].sum() * n).reshape(1)])
    c = torch.cat([counts[~small], counts[small].sum().reshape(1)])
    if e[-1] < 1e-9:
        e, c = e[:-1], c[:-1]
    return float(((c - e) ** 2 / e).sum()), len(e) - 1
