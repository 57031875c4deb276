"""The distillation trainer: AdamW, linear warmup then cosine decay, gradient accumulation, checkpoints that
resume to the same loss curve, a progress bar, and evaluation by held-out KL and by the acceptance rate the real
speculative engine reports with the checkpoint as its draft.

Data order is a pure function of the seed: epoch ``e`` visits the training records in the order of a
permutation drawn from a generator seeded with ``(seed, e)``, micro-batch ``m`` is the ``m``-th run of
``batch_size`` records of that stream, and optimizer step ``s`` uses micro-batches ``s * grad_accum`` onwards.
A checkpoint (``OUT/checkpoints/step-NNNNNN/``) is an HF directory (config.json, model.safetensors, tokenizer
files: loadable as a draft; the engine reads every ``*.safetensors`` at the top, so nothing else lies there) plus
``trainer/optimizer.safetensors`` (AdamW moments and steps, the torch RNG state) and
``trainer_state.json`` (step, seed, data position, losses, evaluations), written last, so a directory without
it is incomplete and ignored on resume.

The student trains as a transformers model (``student.training_module``); only the rows with a teacher target
(completion positions unless ``mask_prompt`` is off) go through the head, the largest matrix of a small draft.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from fastinfer.distill.data import TeacherData
from fastinfer.distill.losses import LOSSES, SparseTarget, distill_loss
from fastinfer.distill.student import training_module

logger = logging.getLogger("fastinfer")
STATE, OPTIM = "trainer_state.json", os.path.join("trainer", "optimizer.safetensors")


@dataclass
class TrainConfig:
    steps: int = 200
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup: int = 10
    weight_decay: float = 0.0
    batch_size: int = 4  # sequences per micro-batch
    grad_accum: int = 1
    max_len: int = 1024  # sequences are cut to their first max_len tokens
    loss: str = "fkl"
    beta: float = 0.5
    temperature: float = 1.0
    alpha: float = 0.0  # cross-entropy mix
    mask_prompt: bool = True
    train_embeddings: bool = False  # the embeddings (and a tied head) stay the teacher's by default
    grad_clip: float = 1.0
    seed: int = 0
    save_every: int = 50
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0: evaluate only before and after training
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}: choose from {', '.join(LOSSES)}")
        for name in ("steps", "batch_size", "grad_accum", "max_len", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup < 0 or self.eval_every < 0:
            raise ValueError("lr must be > 0, min_lr_ratio in [0, 1], warmup and eval_every >= 0")


@dataclass
class TrainResult:
    out_dir: str
    losses: list[float] = field(default_factory=list)  # one per optimizer step, from step 1
    evals: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int = 0


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine to ``min_lr_ratio``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n_records: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_records, generator=g).tolist()


def micro_batch(cfg: TrainConfig, n_records: int, index: int) -> list[int]:
    """Record indices of micro-batch ``index`` (the deterministic data order)."""
    out = []
    for pos in range(index * cfg.batch_size, (index + 1) * cfg.batch_size):
        epoch, i = divmod(pos, n_records)
        out.append(_epoch_order(cfg.seed, epoch, n_records)[i])
    return out


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    rows: torch.Tensor  # [N, 2] (sequence, position) of each target row
    target: SparseTarget  # [N, k]
    labels: torch.Tensor  # [N] the next token at each row

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def make_batch(data: TeacherData, indices: Sequence[int], max_len: int, mask_prompt: bool) -> Batch:
    recs = [data.records[i] for i in indices]
    seqs = [r.tokens[:max_len] for r in recs]
    t = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    att = torch.zeros(len(seqs), t, dtype=torch.long)
    rows, tids, tlps, labels = [], [], [], []
    for b, (r, s) in enumerate(zip(recs, seqs)):
        ids[b, :len(s)] = torch.tensor(s)
        att[b, :len(s)] = 1
        first = max(r.target_start, r.prompt_len - 1 if mask_prompt else 0)
        last = len(s) - 2  # the last position with a next token inside the cut
        if last < first:
            continue
        pos = torch.arange(first, last + 1)
        rows.append(torch.stack([torch.full_like(pos, b), pos], 1))
        tids.append(r.topk_ids[first - r.target_start:last + 1 - r.target_start].long())
        tlps.append(r.topk_logprobs[first - r.target_start:last + 1 - r.target_start])
        labels.append(torch.tensor(s[first + 1:last + 2]))
    if not rows:
        raise ValueError("a micro-batch has no target positions (sequences shorter than their prompts + 1, "
                         "or max_len below the prompt lengths)")
    return Batch(ids, att, torch.cat(rows), SparseTarget(torch.cat(tids), torch.cat(tlps)), torch.cat(labels))


def batch_loss(model: Any, batch: Batch, cfg: TrainConfig) -> torch.Tensor:
    dev = cfg.device
    hidden = model.get_decoder()(input_ids=batch.input_ids.to(dev),
                                 attention_mask=batch.attention_mask.to(dev)).last_hidden_state
    rows = batch.rows.to(dev)
    logits = model.get_output_embeddings()(hidden[rows[:, 0], rows[:, 1]])  # [N, V]: only the target rows
    target = SparseTarget(batch.target.ids.to(dev), batch.target.logprobs.to(dev))
    return distill_loss(logits, target, cfg.loss, beta=cfg.beta, temperature=cfg.temperature,
                        labels=batch.labels.to(dev), alpha=cfg.alpha)


@torch.no_grad()
def held_out_kl(model: Any, data: TeacherData, cfg: TrainConfig) -> float:
    """Forward KL(teacher || student) over the top-k + tail buckets, averaged over every target row of
    ``data`` (temperature 1, prompt rows masked as in training)."""
    total, n = 0.0, 0
    kl_cfg = dataclasses.replace(cfg, loss="fkl", temperature=1.0, alpha=0.0)
    for i in range(0, len(data), cfg.batch_size):
        batch = make_batch(data, range(i, min(len(data), i + cfg.batch_size)), cfg.max_len, cfg.mask_prompt)
        rows = batch.rows.shape[0]
        total += float(batch_loss(model, batch, kl_cfg)) * rows
        n += rows
    return total / max(1, n)


def measure_acceptance(teacher: str, draft_dir: str, prompts: Sequence[list[int]], num_speculative_tokens: int = 4,
                       max_tokens: int = 64, **llm_kwargs: Any) -> dict[str, float]:
    """Greedy generation by ``LLM(teacher)`` with ``draft_dir`` as its draft (drafting every step:
    ``cost_aware=False``, and for every batch size: greedy acceptance does not depend on the batch) over
    ``prompts``, all submitted together: the engine's own ``spec_summary()`` (acceptance_rate,
    mean_acceptance_length, draft / accepted tokens)."""
    import gc

    from fastinfer import LLM, SamplingParams

    llm_kwargs.setdefault("load_progress", False)
    spec = {"method": "draft_model", "model": draft_dir, "cost_aware": False,
            "num_speculative_tokens": num_speculative_tokens, "disable_by_batch_size": max(4, len(prompts))}
    llm = LLM(teacher, speculative_config=spec, **llm_kwargs)
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    summary = llm.engine.spec_summary()
    if not summary["draft_tokens"]:
        raise RuntimeError(f"the engine drafted no tokens with {draft_dir}: no acceptance to measure")
    del llm
    gc.collect()
    return {k: float(v) for k, v in summary.items()}


class Trainer:
    """Train the student in ``student_dir`` on ``data`` into ``out_dir`` (see the module docstring)."""

    def __init__(self, student_dir: str, data: TeacherData, out_dir: str, cfg: TrainConfig,
                 held_out: TeacherData | None = None, acceptance: Callable[[str], float] | None = None) -> None:
        if not len(data):
            raise ValueError("no training records")
        self.student_dir, self.data, self.out_dir, self.cfg = student_dir, data, out_dir, cfg
        self.held_out, self.acceptance = held_out, acceptance
        self.model = training_module(student_dir).to(cfg.device)
        self.model.train()
        if not cfg.train_embeddings:
            for m in (self.model.get_input_embeddings(), self.model.get_output_embeddings()):
                for p in m.parameters():
                    p.requires_grad_(False)
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
        self.result = TrainResult(out_dir)
        self.step = 0

    # ------------------------------------------------------------------------------------ checkpoints
    def _ckpt_dir(self, step: int) -> str:
        return os.path.join(self.out_dir, "checkpoints", f"step-{step:06d}")

    def save_model(self, d: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(d, exist_ok=True)
        for f in os.listdir(self.student_dir):
            if f != "model.safetensors" and f != STATE and os.path.isfile(os.path.join(self.student_dir, f)):
                shutil.copy(os.path.join(self.student_dir, f), d)
        sd = self.model.state_dict()
        if getattr(self.model.config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
        save_file({k: v.detach().float().cpu().contiguous() for k, v in sd.items()},
                  os.path.join(d, "model.safetensors"), metadata={"format": "pt"})

    def save_checkpoint(self) -> str:
        from safetensors.torch import save_file

        d = self._ckpt_dir(self.step)
        if os.path.exists(d):
            shutil.rmtree(d)
        self.save_model(d)
        tensors = {"rng.torch": torch.get_rng_state()}
        for i, p in enumerate(self.params):
            for k, v in self.opt.state.get(p, {}).items():
                tensors[f"{i}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
        os.makedirs(os.path.dirname(os.path.join(d, OPTIM)), exist_ok=True)
        save_file(tensors, os.path.join(d, OPTIM))
        state = {"step": self.step, "seed": self.cfg.seed, "data_position": self.step * self.cfg.grad_accum,
                 "params": self.names, "losses": self.result.losses, "evals": self.result.evals,
                 "config": dataclasses.asdict(self.cfg)}
        with open(os.path.join(d, STATE + ".tmp"), "w") as fh:
            json.dump(state, fh)
        os.replace(os.path.join(d, STATE + ".tmp"), os.path.join(d, STATE))
        done = sorted(c for c in os.listdir(os.path.dirname(d)) if c.startswith("step-"))
        for old in done[:-self.cfg.keep_checkpoints]:
            shutil.rmtree(os.path.join(os.path.dirname(d), old), ignore_errors=True)
        return d

    def last_checkpoint(self) -> str | None:
        root = os.path.join(self.out_dir, "checkpoints")
        if not os.path.isdir(root):
            return None
        done = sorted(c for c in os.listdir(root) if os.path.exists(os.path.join(root, c, STATE)))
        return os.path.join(root, done[-1]) if done else None

    def resume(self) -> int:
        """Load the last complete checkpoint (weights, AdamW state, RNG, step); returns its step (0: none)."""
        from safetensors.torch import load_file

        d = self.last_checkpoint()
        if d is None:
            return 0
        with open(os.path.join(d, STATE)) as fh:
            state = json.load(fh)
        if state["params"] != self.names or state["seed"] != self.cfg.seed:
            raise ValueError(f"checkpoint {d} was written by a run with other parameters or seed")
        weights = load_file(os.path.join(d, "model.safetensors"))
        missing = self.model.load_state_dict(weights, strict=False).missing_keys
        if [k for k in missing if k != "lm_head.weight"]:
            raise ValueError(f"checkpoint {d} lacks {missing}")
        opt = load_file(os.path.join(d, OPTIM))
        self.opt.load_state_dict({
            "state": {i: {k.split(".", 1)[1]: v for k, v in opt.items() if k.split(".", 1)[0] == str(i)}
                      for i in range(len(self.params)) if f"{i}.step" in opt},
            "param_groups": self.opt.state_dict()["param_groups"]})
        torch.set_rng_state(opt["rng.torch"])
        self.step = int(state["step"])
        self.result.losses = list(state["losses"])
        self.result.evals = list(state["evals"])
        self.result.resumed_from = self.step
        logger.info("resumed from %s (step %d)", d, self.step)
        return self.step

    # ------------------------------------------------------------------------------------ training
    def evaluate(self) -> dict[str, Any]:
        row: dict[str, Any] = {"step": self.step}
        if self.held_out is not None and len(self.held_out):
            self.model.eval()
            row["held_out_kl"] = held_out_kl(self.model, self.held_out, self.cfg)
            self.model.train()
        if self.acceptance is not None:
            d = os.path.join(self.out_dir, "eval-draft")
            self.save_model(d)
            row["acceptance"] = self.acceptance(d)
        self.result.evals.append(row)
        logger.info("distill eval: %s", row)
        return row

    def train_step(self) -> tuple[float, int]:
        cfg = self.cfg
        for g in self.opt.param_groups:
            g["lr"] = lr_at(cfg, self.step)
        self.opt.zero_grad(set_to_none=True)
        total, tokens = 0.0, 0
        for m in range(self.step * cfg.grad_accum, (self.step + 1) * cfg.grad_accum):
            batch = make_batch(self.data, micro_batch(cfg, len(self.data), m), cfg.max_len, cfg.mask_prompt)
            loss = batch_loss(self.model, batch, cfg) / cfg.grad_accum
            loss.backward()
            total += float(loss.detach())
            tokens += batch.num_tokens
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.opt.step()
        self.step += 1
        return total, tokens

    def run(self, resume: bool = False, on_step: Callable[[int, float], None] | None = None,
            progress: bool = True) -> TrainResult:
        """Train to ``cfg.steps`` (from the last checkpoint with ``resume``), evaluating before, every
        ``eval_every`` steps and after; the final weights go to ``out_dir`` as an HF directory."""
        cfg = self.cfg
        if resume:
            self.resume()
        if self.step == 0:
            torch.manual_seed(cfg.seed)
            self.evaluate()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="distill", unit="step", disable=not progress)
        t0, seen = time.perf_counter(), 0
        while self.step < cfg.steps:
            loss, tokens = self.train_step()
            seen += tokens
            self.result.losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{seen / (time.perf_counter() - t0):.0f}")
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                self.evaluate()
            if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                self.save_checkpoint()
            if on_step is not None:
                on_step(self.step, loss)
        bar.close()
        self.save_model(self.out_dir)  # the trained draft first: an evaluation that fails does not lose it
        self._write_log()
        if not self.result.evals or self.result.evals[-1]["step"] != self.step:
            self.evaluate()
        shutil.rmtree(os.path.join(self.out_dir, "eval-draft"), ignore_errors=True)
        self._write_log()
        return self.result

    def _write_log(self) -> None:
        with open(os.path.join(self.out_dir, "distill_log.json"), "w") as fh:
            json.dump({"config": dataclasses.asdict(self.cfg), "losses": self.result.losses,
                       "evals": self.result.evals, "resumed_from": self.result.resumed_from}, fh, indent=1)
