"""The ``fastinfer distill`` options, torch-free (the CLI builds its parser from them; ``run.py`` does the work)."""
from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``fastinfer distill`` options to ``p``."""
    p.add_argument("teacher", help="the served model: HF directory, .gguf file or short name")
    p.add_argument("--out", required=True, help="output directory (the trained draft, checkpoints, data)")
    s = p.add_mutually_exclusive_group()
    s.add_argument("--layers-every", type=int, default=None, help="student of every K-th teacher layer plus the "
                   "last (default 6)")
    s.add_argument("--student-config", type=json.loads, default=None,
                   help='JSON overrides of the teacher config for a random student, e.g. \'{"num_hidden_layers": 2}\'')
    p.add_argument("--hidden-size", type=int, default=None, help="project a layer student to this hidden size")
    d = p.add_mutually_exclusive_group()
    d.add_argument("--data", default=None, help="teacher data file written by an earlier run (safetensors)")
    d.add_argument("--generate", type=int, default=256, help="prompts the teacher generates from (default 256)")
    p.add_argument("--prompts", default=None, help="prompts file (.jsonl with prompt / messages, or blank-line "
                   "separated text; default: built-in standard-library docstrings)")
    p.add_argument("--on-policy", action="store_true", help="the initial student generates, the teacher scores")
    p.add_argument("--chat", default="alternate", choices=["alternate", "always", "never"])
    p.add_argument("--max-prompt-len", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=128, help="tokens generated per prompt")
    p.add_argument("--ignore-eos", action="store_true", help="the teacher generates --max-tokens whatever (as the "
                   "speculative benchmarks measure)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature of the data generation "
                   "(default: 0, greedy, off-policy; 1 on-policy)")
    p.add_argument("--top-k", type=int, default=20, help="teacher logprobs kept per position (<= 20)")
    p.add_argument("--loss", default="fkl", choices=["fkl", "rkl", "jsd", "tv"])
    p.add_argument("--beta", type=float, default=0.5, help="JSD interpolation (0: forward KL, 1: reverse KL)")
    p.add_argument("--distill-temperature", type=float, default=1.0, help="temperature of both distributions")
    p.add_argument("--alpha", type=float, default=0.0, help="weight of the cross-entropy on the tokens")
    p.add_argument("--no-mask-prompt", dest="mask_prompt", action="store_false",
                   help="train on the prompt positions too (the teacher scores them)")
    p.add_argument("--train-embeddings", action="store_true", help="train the embeddings / tied head too")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-len", type=int, default=1024, help="training sequences are cut to this many tokens")
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--eval-every", type=int, default=0, help="acceptance / held-out KL every N steps (0: before "
                   "and after only)")
    p.add_argument("--eval-prompts", type=int, default=8, help="held-out prompts for the acceptance (0: none)")
    p.add_argument("--eval-k", type=int, default=4, help="num_speculative_tokens of the acceptance runs")
    p.add_argument("--eval-max-tokens", type=int, default=64)
    p.add_argument("--held-out", type=int, default=16, help="teacher sequences kept out of training for the KL")
    p.add_argument("--dtype", default="auto", help="engine dtype for generation and acceptance")
    p.add_argument("--device", default="cpu", help="training device (cpu, cuda)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
