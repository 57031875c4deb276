"""Model families: the native implementation vs the generic Hugging Face path (``model_impl="transformers"``),
and Gemma 3 270M (its real Q4_K_M GGUF) vs llama.cpp on the same file, in one run.

    python benchmarks/bench_models.py                      # every family, small random models, + Gemma 3 270M
    python benchmarks/bench_models.py --families gpt2,qwen3 --no-gemma3

Per family a small random model (hidden 256, 4 layers, fp32) is built from its ``transformers`` config and
saved with safetensors. Rates: single-stream decode tok/s ((N - 1) / (time for N tokens - time for 1 token),
medians) and the output tok/s of 8 concurrent requests. ``native/generic`` is the same-run ratio. Families
without a native class get only the generic row. Gemma 3 270M: fastinfer dequantized fp32 and with the file's
own quantized tensors (``quantization="gguf"``) vs llama.cpp (``llama-cpp-python``, when installed).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import emit, llama_cpp_rate, machine_line, make_workload, single_stream_rate, table  # noqa: E402

from fastinfer import LLM, SamplingParams  # noqa: E402

VOCAB = 49152  # the SmolLM2 tokenizer's, saved beside each random model


def family_configs() -> dict:
    """name -> transformers config of a small random model."""
    import transformers as t

    c = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)
    gpt = dict(vocab_size=VOCAB, n_embd=256, n_layer=4, n_head=8, n_positions=2048)
    return {
        "llama": t.LlamaConfig(**c),
        "qwen3": t.Qwen3Config(**c, head_dim=32),
        "gemma2": t.Gemma2Config(**c, head_dim=32, sliding_window=128),
        "gemma3": t.Gemma3TextConfig(**c, head_dim=32, sliding_window=128),
        "phi3": t.Phi3Config(**c),
        "gpt2": t.GPT2Config(**gpt),
        "gpt_neox": t.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                    num_attention_heads=8, max_position_embeddings=2048, rotary_pct=0.25),
        "opt": t.OPTConfig(vocab_size=VOCAB, hidden_size=256, ffn_dim=768, num_hidden_layers=4,
                           num_attention_heads=8, max_position_embeddings=2048, word_embed_proj_dim=256),
        "stablelm": t.StableLmConfig(**c),
        "gptj": t.GPTJConfig(vocab_size=VOCAB, n_embd=256, n_layer=4, n_head=8, n_positions=2048, rotary_dim=16),
    }


def save_random_model(cfg, path: str, tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def rates(model: str, impl: str, ids: list[int], batch: list[list[int]], n: int, repeats: int,
          **kw) -> tuple[float, float]:
    """(single-stream decode tok/s, 8-request output tok/s) of one engine."""
    import time

    llm = LLM(model, model_impl=impl, max_model_len=2048, max_num_seqs=8, load_progress=False, **kw)
    single = single_stream_rate(llm, ids, n, repeats)
    sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], sp, use_tqdm=False)
    batched = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)
    return single, batched


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="", help="comma-separated subset (default: all)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-gemma3", action="store_true")
    ap.add_argument("--no-llama-cpp", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from fastinfer.models.loader import load_tokenizer
    from fastinfer.models.registry import is_supported

    print(machine_line(), flush=True)
    tok = load_tokenizer("smollm2-135m")
    texts = [w["prompt"] for w in make_workload("mixed", 9, 0)]
    ids = tok.encode(texts[0])[:128]
    batch = [tok.encode(t)[:128] for t in texts[1:]]
    rows: list[dict] = []
    cfgs = family_configs()
    chosen = [f for f in args.families.split(",") if f] or list(cfgs)
    with tempfile.TemporaryDirectory() as tmp:
        for fam in chosen:
            path = os.path.join(tmp, fam)
            save_random_model(cfgs[fam], path, tok)
            row: dict = {"case": "family", "family": fam, "arch": cfgs[fam].architectures[0]
                         if cfgs[fam].architectures else type(cfgs[fam]).__name__}
            native = is_supported(row["arch"])
            g1, gb = rates(path, "transformers", ids, batch, args.tokens, args.repeats, dtype="float32")
            row.update(generic_tok_s=g1, generic_batch8_tok_s=gb)
            if native:
                n1, nb = rates(path, "fastinfer", ids, batch, args.tokens, args.repeats, dtype="float32")
                row.update(native_tok_s=n1, native_batch8_tok_s=nb, native_over_generic=n1 / g1,
                           batch8_native_over_generic=nb / gb)
            emit(row, rows)
    print()
    print(table(rows, ["family", "arch", "native_tok_s", "generic_tok_s", "native_over_generic",
                       "native_batch8_tok_s", "generic_batch8_tok_s", "batch8_native_over_generic"]))
    if not args.no_gemma3:
        gemma3(args, texts[0])


def gemma3(args, text: str) -> None:
    from fastinfer.models.loader import load_tokenizer, resolve_model_path

    try:
        path = resolve_model_path("gemma3-270m")
    except ValueError as e:
        print(f"no Gemma 3 rows: {e}", file=sys.stderr)
        return
    ids = load_tokenizer("gemma3-270m").encode(text)[:256]
    rows: list[dict] = []
    for dtype, q in (("float32", None), ("float32", "gguf")):
        r1, _ = rates(path, "fastinfer", ids, [ids], args.tokens, args.repeats, dtype=dtype, quantization=q)
        emit({"case": "gemma3-270m decode", "engine": "fastinfer", "dtype": dtype,
              "weights": "file's own quantized tensors" if q else "dequantized", "tok_s": r1}, rows)
    lc = None if args.no_llama_cpp else llama_cpp_rate(path, ids, args.tokens, args.repeats, args.threads)
    if lc is not None:
        emit({"case": "gemma3-270m decode", "engine": "llama.cpp", "dtype": "-", "weights": "Q4_K_M",
              "tok_s": lc}, rows)
    for r in rows:
        r["vs_llama_cpp"] = r["tok_s"] / lc if lc else float("nan")
    print()
    print(f"Gemma 3 270M Q4_K_M: prompt {len(ids)} tokens, {args.tokens} new tokens, {args.threads} threads, "
          f"medians of {args.repeats}")
    print(table(rows, ["engine", "dtype", "weights", "tok_s", "vs_llama_cpp"]))


if __name__ == "__main__":
    main()
