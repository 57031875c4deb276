"""``fastinfer verify``: the served model, with the user's settings, against HF transformers on a set of prompts.

Per prompt, HF transformers (float32, the reference) continues the prompt greedily for ``max_new_tokens``
tokens; both models then score that sequence teacher-forced (HF in one forward, ours through
:meth:`fastinfer.LLM.prompt_logits`: the served model, op set and paged KV cache), and at every position we
compare the next-token distributions: KL(HF || ours) in float64 from ``log_softmax`` (mean and max), top-1
agreement (same argmax) and top-5 agreement (the share of HF's five most likely tokens that are in ours). Our
greedy generation runs through ``LLM.generate`` (so speculative decoding, prefix caching and chunked prefill
take part) and is compared token by token with HF's: the first position where they differ, None when the
``max_new_tokens`` tokens are identical.
"""
from __future__ import annotations

import functools
import inspect
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from fastinfer.models.loader import resolve_model_path
from fastinfer.sampling_params import SamplingParams

if TYPE_CHECKING:
    from fastinfer.entrypoints.llm import LLM

DEFAULT_PROMPTS = (
    "The capital of France is",
    "Photosynthesis is the process by which green plants",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea, there lived",
    "The three laws of thermodynamics state that",
)
TOP_K = 5


def load_prompts(path: str) -> list[str]:
    """Prompts from a UTF-8 file: one per non-empty line, or for ``*.jsonl`` one JSON value per non-empty line
    (a string, or an object with a ``"prompt"`` string). ValueError naming the file and line otherwise."""
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    prompts = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not path.endswith(".jsonl"):
            prompts.append(line)
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not JSON ({e.msg})") from None
        text = value.get("prompt") if isinstance(value, dict) else value
        if not isinstance(text, str) or not text:
            raise ValueError(f"{path}:{i}: want a non-empty JSON string or an object with a \"prompt\" string")
        prompts.append(text)
    if not prompts:
        raise ValueError(f"{path}: no prompts (empty file)")
    return prompts


@functools.lru_cache(maxsize=1)
def load_reference(model: str, device: str = "cpu") -> Any:
    """The HF transformers model (float32, eval mode, on ``device``) for a short name, HF directory or GGUF file
    (which transformers dequantizes). Kept for the process (the last one), so verifying several settings of one
    model in one process loads it once. ValueError when transformers cannot load it."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model)
    if path.endswith(".gguf"):
        kwargs: dict[str, Any] = {"gguf_file": os.path.basename(path)}
        path = os.path.dirname(path) or "."
    else:
        kwargs = {}
        with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
            qcfg = json.load(fh).get("quantization_config") or {}
        if qcfg.get("quant_method") == "fastinfer":
            raise ValueError(f"{model} was saved by `fastinfer quantize` ({qcfg.get('method')}), which HF "
                             "transformers cannot read: verify the float model with --quantization "
                             f"{qcfg.get('method')} instead")
    try:
        hf: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise ValueError(f"HF transformers cannot load {model} as a reference: {e}") from e
    return hf.to(device).eval()


@dataclass
class PromptReport:
    prompt: str
    num_prompt_tokens: int
    num_positions: int  # teacher-forced positions compared: prompt + HF's greedy tokens
    mean_kl: float
    max_kl: float
    top1_agreement: float
    top5_agreement: float
    first_divergence: int | None  # first generated position where our greedy token differs from HF's
    tokens: list[int] = field(repr=False)  # ours, greedy
    hf_tokens: list[int] = field(repr=False)


@dataclass
class Summary:
    num_prompts: int
    num_positions: int
    mean_kl: float  # over every position of every prompt
    max_kl: float
    top1_agreement: float
    top5_agreement: float
    num_diverged: int  # prompts whose greedy tokens differ from HF's
    first_divergence: int | None  # the earliest over the prompts


@dataclass
class VerifyReport:
    settings: dict[str, Any]
    prompts: list[PromptReport]
    summary: Summary
    max_kl: float | None  # the gate on summary.mean_kl (None: report only)
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.inference_mode()
def position_stats(ref_logits: torch.Tensor, logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per position of two [T, V] logit tensors: ``kl`` = KL(ref || ours) in float64 (clamped at 0 against
    rounding), ``top1`` (1.0 where the argmax agrees) and ``top5`` (share of ref's top-5 in ours)."""
    if ref_logits.shape != logits.shape:
        raise ValueError(f"logits of shape {tuple(logits.shape)} against a reference of {tuple(ref_logits.shape)} "
                         "(the models' vocabularies differ?)")
    lp_ref = torch.log_softmax(ref_logits.double(), dim=-1)
    lp = torch.log_softmax(logits.double(), dim=-1)
    kl = (lp_ref.exp() * (lp_ref - lp)).sum(-1).clamp_min(0.0)
    k = min(TOP_K, ref_logits.shape[-1])
    ref_top, top = ref_logits.topk(k, dim=-1).indices, logits.topk(k, dim=-1).indices
    top5 = (ref_top[:, :, None] == top[:, None, :]).any(-1).double().mean(-1)
    top1 = (ref_logits.argmax(-1) == logits.argmax(-1)).double()
    return {"kl": kl, "top1": top1, "top5": top5}


@torch.inference_mode()
def hf_greedy(hf: Any, ids: list[int], n: int) -> list[int]:
    """HF's greedy continuation of ``ids``: ``n`` tokens, argmax of each step (end-of-sequence ignored)."""
    device = next(hf.parameters()).device
    # transformers 5.x renamed past_key_values to cache (the old name warns); take what the forward accepts
    name = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    out = hf(torch.tensor([ids], device=device), use_cache=True)
    tokens: list[int] = []
    while True:
        tokens.append(int(out.logits[0, -1].argmax()))
        if len(tokens) == n:
            return tokens
        out = hf(torch.tensor([[tokens[-1]]], device=device), use_cache=True, **{name: getattr(out, name)})


def first_divergence(ours: list[int], ref: list[int]) -> int | None:
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            return i
    return None if len(ours) == len(ref) else min(len(ours), len(ref))


def compare_prompt(llm: LLM, hf: Any, prompt: str, ids: list[int], tokens: list[int], max_new_tokens: int,
                   ) -> tuple[PromptReport, dict[str, torch.Tensor]]:
    """One prompt: HF's greedy continuation, both models' teacher-forced logits over prompt + continuation, and
    our greedy ``tokens`` against HF's. Returns the row and the per-position statistics."""
    ref_tokens = hf_greedy(hf, ids, max_new_tokens)
    seq = ids + ref_tokens
    with torch.inference_mode():
        ref_logits = hf(torch.tensor([seq], device=next(hf.parameters()).device)).logits[0].float().cpu()
    s = position_stats(ref_logits, llm.prompt_logits({"prompt_token_ids": seq}))
    row = PromptReport(prompt, len(ids), len(seq), s["kl"].mean().item(), s["kl"].max().item(),
                       s["top1"].mean().item(), s["top5"].mean().item(), first_divergence(tokens, ref_tokens),
                       tokens, ref_tokens)
    return row, s


def verify(llm: LLM, model: str, prompts: list[str], max_new_tokens: int = 32, max_kl: float | None = None,
           settings: dict[str, Any] | None = None) -> VerifyReport:
    """Compare ``llm`` (the served ``model``) with HF transformers on ``prompts`` (see the module docstring).
    ``passed`` is False when the mean KL over all positions exceeds ``max_kl`` (or is not a number)."""
    if not prompts:
        raise ValueError("verify needs at least one prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids = [llm.get_tokenizer().encode(p) for p in prompts]
    sp = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": i} for i in ids], sp, use_tqdm=False)
    for p, o in zip(prompts, outs):
        if o.error:
            raise ValueError(f"prompt {p[:40]!r}: {o.error}")
    hf = load_reference(model, llm.engine.device)
    rows, stats = zip(*(compare_prompt(llm, hf, p, i, list(o.outputs[0].token_ids), max_new_tokens)
                        for p, i, o in zip(prompts, ids, outs)))
    every = {k: torch.cat([s[k] for s in stats]) for k in ("kl", "top1", "top5")}
    divs = [r.first_divergence for r in rows if r.first_divergence is not None]
    summary = Summary(len(rows), len(every["kl"]), every["kl"].mean().item(), every["kl"].max().item(),
                      every["top1"].mean().item(), every["top5"].mean().item(), len(divs), min(divs, default=None))
    passed = max_kl is None or summary.mean_kl <= max_kl  # NaN fails
    info = {"model": model, "dtype": llm.engine.dtype, "device": llm.engine.device, "reference": "transformers float32",
            "max_new_tokens": max_new_tokens, "kv_cache_dtype": llm.engine.config.kv_cache_dtype, **(settings or {})}
    return VerifyReport(info, list(rows), summary, max_kl, passed)


def _kl(x: float) -> str:
    return f"{x:9.2e}" if math.isfinite(x) else f"{x:>9}"


def format_report(report: VerifyReport) -> str:
    """The human-readable table: one row per prompt, then the summary and the verdict."""
    s = report.settings
    head = ", ".join(f"{k}={v}" for k, v in s.items() if k not in ("model", "reference") and v is not None)
    lines = [f"fastinfer verify: {s['model']} ({head}) vs HF {s['reference']}",
             f"{'#':>4} {'tokens':>6} {'mean KL':>9} {'max KL':>9} {'top-1':>6} {'top-5':>6} {'diverge':>7}  prompt"]

    def row(name: str, n: int, mean: float, mx: float, t1: float, t5: float, div: int | None, text: str) -> str:
        return (f"{name:>4} {n:>6} {_kl(mean)} {_kl(mx)} {t1:6.3f} {t5:6.3f} {'-' if div is None else div:>7}  "
                f"{text}")

    for i, r in enumerate(report.prompts, 1):
        text = r.prompt.replace("\n", "\\n")
        lines.append(row(str(i), r.num_positions, r.mean_kl, r.max_kl, r.top1_agreement, r.top5_agreement,
                         r.first_divergence, text if len(text) <= 40 else text[:37] + "..."))
    m = report.summary
    lines.append(row("all", m.num_positions, m.mean_kl, m.max_kl, m.top1_agreement, m.top5_agreement,
                     m.first_divergence, f"{m.num_diverged} of {m.num_prompts} prompts diverge"))
    if report.max_kl is not None:
        verdict = "PASS" if report.passed else "FAIL"
        op = "<=" if report.passed else ">"
        lines.append(f"{verdict}: mean KL {m.mean_kl:.3e} {op} --max-kl {report.max_kl:g}")
    return "\n".join(lines)
