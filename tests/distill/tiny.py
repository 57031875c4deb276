"""A tiny random teacher for the distillation tests: a 2-layer Llama over a 64-token word-level vocabulary
("t0".."t63"), built in-test. Its embeddings and head are large next to its layer weights, so its next-token
distribution is sharp and mostly (not only) a function of the last token: a small random student can learn it
in a few hundred steps, which makes "distilling raises the acceptance rate" a reliable test."""
from __future__ import annotations

import torch

VOCAB = 64


def make_teacher(out_dir: str, seed: int = 0, layer_scale: float = 0.1) -> str:
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 if "embed" in name else 0.5 if "lm_head" in name else layer_scale)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t0",
                                         eos_token="t1").save_pretrained(out_dir)
    return out_dir


def random_prompts(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (length,), generator=g).tolist() for _ in range(n)]


STUDENT = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
           "num_key_value_heads": 1, "head_dim": 16}
