"""Speculative decoding: for each proposer (n-gram prompt lookup, a draft model, the int4 self-draft), the
single-stream decode speed-up over plain decoding on input-grounded prompts ("repeat this passage"), the
acceptance rate, mean acceptance length and draft / verify time, and throughput at 32 concurrent requests with
adaptive speculation vs none, in one run.

    python benchmarks/bench_spec.py [--model smollm2-135m] [--k 4] [--proposers ngram,draft,int4-self]
                                    [--draft-model DIR_OR_GGUF | --draft-layers 20] [--always-draft] [--compile]
                                    [--quick]

The draft model is ``--draft-model`` (any model sharing the target's tokenizer) or, by default, a sibling made from
the target's first ``--draft-layers`` layers (written to a temporary directory): SmolLM2-135M has no smaller
released sibling. Draft models are cost-aware (they draft only for requests whose measured acceptance pays for the
measured draft cost); ``--always-draft`` makes them draft every step. ``--compile`` compiles the batch-1 decode step
of every engine (the plain one too, so ratios stay same-mode) and of the draft model. ``--quick`` runs tiny settings
(one prompt, a few tokens, 4 concurrent requests) to check that the script works; its figures mean nothing.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import emit, make_workload, table, throughput  # noqa: E402

from fastinfer import LLM, SamplingParams  # noqa: E402

PROPOSERS = ("ngram", "draft", "int4-self")


def decode_speed(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    """Median single-stream tok/s over the prompts (one at a time) and the generated tokens."""
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    speeds, outs = [], []
    for p in prompts:
        t = time.perf_counter()
        o = llm.generate({"prompt_token_ids": p}, sp, use_tqdm=False)[0]
        speeds.append(len(o.outputs[0].token_ids) / (time.perf_counter() - t))
        outs.append(o.outputs[0].token_ids)
    return statistics.median(speeds), outs


def workload_prompts(llm: LLM, kind: str, n: int, limit: int) -> list[list[int]]:
    """Token ids (the last ``limit``) of ``n`` prompts of a standard workload: ``grounded`` through the chat
    template (seed 0), ``mixed`` as plain text (seed 3), as this benchmark has always built them."""
    if kind == "grounded":
        return [llm.chat_prompt(w["messages"])["prompt_token_ids"][-limit:] for w in make_workload(kind, n, 0)]
    tok = llm.get_tokenizer()
    return [tok.encode(w["prompt"])[-limit:] for w in make_workload(kind, n, 3)]


def spec_single_stream(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]], dict]:
    """``decode_speed`` of a speculative ``llm`` (after a warm-up) and the engine's speculation figures over
    those runs alone: acceptance rate, mean acceptance length, draft and verify seconds."""
    eng = llm.engine
    decode_speed(llm, prompts[:1], 8)  # warm-up
    before = eng.spec_summary()
    fast, out = decode_speed(llm, prompts, max_tokens)
    st = {k: v - before[k] for k, v in eng.spec_summary().items()}
    return fast, out, {"acceptance_rate": st["accepted_tokens"] / max(1, st["draft_tokens"]),
                       "mean_acceptance_length": 1 + st["accepted_tokens"] / max(1, st["steps"]),
                       "draft_time_s": st["draft_time_s"], "verify_time_s": st["verify_time_s"]}


def make_sibling(model: str, num_layers: int, out_dir: str) -> str:
    """A draft model made of ``model``'s first ``num_layers`` layers (same embeddings, final norm, lm_head and
    tokenizer), written as an HF directory. ``model`` is a GGUF file / short name or an HF directory."""
    from fastinfer.distill.student import layer_student, load_teacher

    teacher = load_teacher(model)
    if not 1 <= num_layers < teacher.num_layers:
        raise SystemExit(f"--draft-layers must be in [1, {teacher.num_layers - 1}]")
    return layer_student(teacher, range(num_layers), out_dir)


def num_layers_of(model: str) -> int:
    from fastinfer.config import ModelConfig
    from fastinfer.models.gguf_loader import GGUFFile
    from fastinfer.models.loader import resolve_model_path

    path = resolve_model_path(model)
    if path.endswith(".gguf"):
        return GGUFFile(path).model_config().num_hidden_layers
    with open(os.path.join(path, "config.json")) as fh:
        return ModelConfig.from_hf_dict(json.load(fh)).num_hidden_layers


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--concurrent", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--proposers", default=",".join(PROPOSERS), help=f"comma-separated subset of {PROPOSERS}")
    ap.add_argument("--draft-model", default=None, help="draft for 'draft' (default: a sibling of --draft-layers)")
    ap.add_argument("--draft-layers", type=int, default=None,
                    help="layers of the default sibling draft (default: two thirds of the target's)")
    ap.add_argument("--self-quantization", default="int4", help="quantization of the self-draft")
    ap.add_argument("--always-draft", action="store_true",
                    help="draft models draft every step (cost_aware=False) instead of only when it pays off")
    ap.add_argument("--compile", action="store_true",
                    help="compile the batch-1 decode step of the target (plain and speculative) and of the draft "
                         "(compilation_config mode compile, rung 1): the speed-up at the lower per-step overhead")
    ap.add_argument("--quick", action="store_true", help="tiny settings, to check that the script runs")
    args = ap.parse_args(argv)
    if args.quick:
        args.prompts, args.max_tokens, args.concurrent = 1, 12, 4
        args.max_model_len = min(args.max_model_len, 512)
    proposers = [p for p in args.proposers.split(",") if p]
    unknown = set(proposers) - set(PROPOSERS)
    if unknown:
        raise SystemExit(f"unknown proposers {sorted(unknown)}; choose from {PROPOSERS}")
    tmp = tempfile.mkdtemp(prefix="bench-spec-")
    try:
        return run(args, proposers, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, proposers: list[str], tmp: str) -> list[dict]:
    common = dict(dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=args.concurrent,
                  load_progress=False)
    if args.compile:  # batch 1 compiled, larger decode batches eager (the throughput rows)
        common["compilation_config"] = {"mode": "compile", "cudagraph_capture_sizes": [1]}
    plain = LLM(args.model, **common)
    tok = plain.get_tokenizer()
    limit = args.max_model_len - args.max_tokens - args.k - 2
    grounded = workload_prompts(plain, "grounded", args.prompts, limit)
    items = [{"ids": tok.encode(w["prompt"])[-limit:],
              "max_tokens": min(w["max_tokens"], 2 * args.max_tokens) if args.quick else w["max_tokens"]}
             for w in make_workload("mixed", args.concurrent, 3)]
    decode_speed(plain, grounded[:1], 8)  # warm-up
    base, base_out = decode_speed(plain, grounded, args.max_tokens)
    base_tp = throughput(plain, items)
    configs = {"ngram": {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": 4,
                         "prompt_lookup_min": 2},
               "int4-self": {"method": "draft_model", "quantization": args.self_quantization,
                             "num_speculative_tokens": args.k, "cost_aware": not args.always_draft}}
    labels = {"ngram": "ngram", "int4-self": f"{args.self_quantization} self-draft"}
    if "draft" in proposers:
        draft = args.draft_model
        if draft is None:
            layers = args.draft_layers or max(1, num_layers_of(args.model) * 2 // 3)
            draft = make_sibling(args.model, layers, os.path.join(tmp, "sibling"))
            labels["draft"] = f"draft: first {layers} layers"
        else:
            labels["draft"] = f"draft: {os.path.basename(draft.rstrip('/'))}"
        configs["draft"] = {"method": "draft_model", "model": draft, "num_speculative_tokens": args.k,
                            "cost_aware": not args.always_draft}
    rows: list[dict] = []
    for name in proposers:
        llm = LLM(args.model, speculative_config=configs[name], **common)
        fast, fast_out, st = spec_single_stream(llm, grounded, args.max_tokens)
        emit({"case": "single_stream_grounded", "proposer": labels[name], "k": args.k, "plain_tok_s": base,
              "spec_tok_s": fast, "ratio": fast / base, "identical": base_out == fast_out, **st}, rows)
        tp = throughput(llm, items)
        emit({"case": f"throughput_{args.concurrent}_concurrent", "proposer": f"{labels[name]} (adaptive)",
              "plain_tok_s": base_tp, "spec_tok_s": tp, "ratio": tp / base_tp}, rows)
        del llm
        gc.collect()
    print()
    print(table(rows, ["case", "proposer", "plain_tok_s", "spec_tok_s", "ratio", "acceptance_rate",
                       "mean_acceptance_length", "draft_time_s", "verify_time_s"]))
    return rows


if __name__ == "__main__":
    main()
