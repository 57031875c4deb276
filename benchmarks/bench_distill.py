"""Distilled draft models: a student of a few SmolLM2-135M layers trained by ``fastinfer distill``, measured as a
speculative draft against the same student before training, today's 20-layer truncated draft and the int4
self-draft (acceptance rate and single-stream speed-up over plain decoding), on the grounded and mixed
workloads, in one run. Two phases, so training can run on a busy machine and timing on a quiet one:

    python benchmarks/bench_distill.py --train [--out DIR]      # tens of minutes on a CPU: writes DIR
    python benchmarks/bench_distill.py --measure --student DIR  # a few minutes: the table

``--train`` is ``fastinfer distill`` with this benchmark's configuration (printed, with the draft's size);
``--measure`` decodes ``--prompts`` prompts of each workload one at a time (greedy, ``--max-tokens`` tokens,
EOS ignored) with plain decoding and with each draft, drafting every step (``always``: the acceptance rate of
the draft itself) and under the engine's default cost-aware rule (``cost-aware``: it drafts only while drafting
pays, so a poor draft costs little and shows an acceptance of 0 when it never drafts; ``--modes`` picks).
The training prompts are standard-library docstrings; the workloads are CPython's reference manual
(``pydoc_data``): other text. ``--quick`` runs tiny settings to check that the script works.
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import shlex
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from bench_spec import decode_speed, make_sibling, spec_single_stream, workload_prompts  # noqa: E402
from common import emit, machine_line, table  # noqa: E402

from fastinfer import LLM  # noqa: E402

MODES = ("always", "cost-aware")
DEFAULT_OUT = os.path.expanduser("~/.cache/fastinfer/distill-smollm2")
# The benchmark's training configuration: ``fastinfer distill TEACHER --out DIR`` plus these options.
TRAIN_ARGS = ["--layers-every", "6", "--generate", "320", "--max-tokens", "128", "--ignore-eos",
              "--max-prompt-len", "384", "--top-k", "20", "--steps", "300", "--batch-size", "4", "--lr", "3e-4",
              "--warmup", "30", "--save-every", "25", "--eval-every", "150", "--eval-prompts", "8",
              "--eval-k", "4", "--eval-max-tokens", "64"]


def train(model: str, out: str, extra: list[str]) -> None:
    from fastinfer.distill.options import add_arguments
    from fastinfer.distill.run import distill
    from fastinfer.distill.student import student_size

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # evals, data, sizes
    argv = [model, "--out", out, *TRAIN_ARGS, *extra]
    p = argparse.ArgumentParser()
    add_arguments(p)
    print("# reproduce: OMP_NUM_THREADS=1 fastinfer distill " + shlex.join(argv), flush=True)
    distill(p.parse_args(argv))
    size = student_size(out)
    print(f"# trained draft: {out}: {size['parameters'] / 1e6:.1f}M parameters, {size['bytes'] / 1e6:.1f} MB "
          "(float32 safetensors)")


def measure(args: argparse.Namespace, tmp: str) -> list[dict]:
    common = dict(dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=4, load_progress=False)
    plain = LLM(args.model, **common)
    limit = args.max_model_len - args.max_tokens - args.k - 2
    prompts = {kind: workload_prompts(plain, kind, args.prompts, limit) for kind in ("grounded", "mixed")}
    decode_speed(plain, prompts["grounded"][:1], 8)  # warm-up
    base = {kind: decode_speed(plain, p, args.max_tokens) for kind, p in prompts.items()}
    del plain
    gc.collect()
    drafts = {f"distilled ({os.path.basename(args.student.rstrip('/'))})": {"model": args.student},
              "before training (init/)": {"model": os.path.join(args.student, "init")}}
    if args.draft_quantization:
        drafts[f"distilled, {args.draft_quantization}"] = {"model": args.student,
                                                           "quantization": args.draft_quantization}
    if not args.quick:
        drafts["truncated: first 20 layers"] = {"model": make_sibling(args.model, 20, os.path.join(tmp, "t20"))}
    drafts["int4 self-draft"] = {"quantization": args.self_quantization}
    rows: list[dict] = []
    for mode in args.modes.split(","):
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}: choose from {', '.join(MODES)}")
        spec = {"num_speculative_tokens": args.k, "cost_aware": mode == "cost-aware"}
        for label, cfg in drafts.items():
            llm = LLM(args.model, speculative_config={"method": "draft_model", **spec, **cfg}, **common)
            for kind, p in prompts.items():
                fast, out, st = spec_single_stream(llm, p, args.max_tokens)
                emit({"case": f"single_stream_{kind}", "draft": label, "mode": mode, "k": args.k,
                      "plain_tok_s": base[kind][0], "spec_tok_s": fast, "ratio": fast / base[kind][0],
                      "identical": out == base[kind][1], **st}, rows)
            del llm
            gc.collect()
    print()
    print(machine_line())
    print(table(rows, ["case", "draft", "mode", "plain_tok_s", "spec_tok_s", "ratio", "acceptance_rate",
                       "mean_acceptance_length", "draft_time_s", "verify_time_s", "identical"]))
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    if "--train" in argv:  # the rest are `fastinfer distill` options, overriding TRAIN_ARGS
        tp = argparse.ArgumentParser(description="the training phase")
        tp.add_argument("--train", action="store_true")
        tp.add_argument("--model", default="smollm2-135m")
        tp.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
        a, extra = tp.parse_known_args(argv)
        train(a.model, a.out, extra)
        return []
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--measure", action="store_true", required=True, help="measure the drafts (or --train)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--student", default=DEFAULT_OUT, help="a directory written by --train")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--draft-quantization", default="int8",
                    help="also measure the distilled draft quantized so ('' to skip; round-to-nearest int4-g32 "
                    "cost the 300-step SmolLM2 student most of its acceptance: 0.25 -> 0.02, int8 0.24)")
    ap.add_argument("--self-quantization", default="int4")
    ap.add_argument("--modes", default=",".join(MODES),
                    help="always: draft every step (cost_aware=False: the draft's acceptance); cost-aware: the "
                    "engine's default rule (drafts only while they pay: the speed a user gets)")
    ap.add_argument("--quick", action="store_true", help="tiny settings, to check that the script runs")
    args = ap.parse_args(argv)
    if args.quick:
        args.prompts, args.max_tokens, args.max_model_len = 1, 12, 512
    tmp = tempfile.mkdtemp(prefix="bench-distill-")
    try:
        return measure(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
