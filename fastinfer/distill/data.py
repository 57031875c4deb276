"""Teacher data through the engine, saved as safetensors (never pickle) and loaded back with validation.

One record is a token sequence (prompt + completion), its prompt length, and per position from
``target_start`` to the second-to-last the teacher's top-k next-token ids and log-probabilities (row ``i`` is
the teacher's distribution of token ``i + 1`` given tokens ``0..i``). The engine's logprobs are of the raw model
distribution (before temperature, penalties or top-k / top-p filtering: ``SamplingParams`` documents it), at most
``MAX_LOGPROBS`` (20) per position.

* off-policy (:func:`generate_off_policy`): the teacher generates from the prompts (``logprobs=k``), optionally
  scoring the prompt too (``prompt_logprobs=k``);
* on-policy (:func:`generate_on_policy`): the student generates, the teacher scores prompt + completion
  (``prompt_logprobs=k``).

Both run every prompt through one ``LLM.generate`` call, so the engine batches them continuously.

The file: tensors ``tokens`` int32 [total], ``offsets`` int64 [N + 1] (record i is ``tokens[offsets[i]:
offsets[i + 1]]``), ``prompt_lens`` / ``target_starts`` int64 [N], ``topk_ids`` int32 [R, k], ``topk_logprobs``
float32 [R, k] (the records' rows, in order), and string metadata ``format``, ``version``, ``top_k``, ``kind``,
``teacher``.
"""
from __future__ import annotations

import inspect
import json
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

FORMAT, VERSION = "fastinfer-distill-data", "1"
_TASKS = ("Repeat the passage above exactly, word for word.", "Summarize the text above in two sentences.",
          "Explain the text above to a new Python programmer.", "What are the key names defined above?",
          "Continue the documentation above in the same style.")
# Standard-library modules whose docstrings are the built-in corpus (they ship with every Python: nothing is
# downloaded). Different text from ``pydoc_data.topics``, which the benchmark workloads use.
_CORPUS_MODULES = ("argparse", "asyncio", "base64", "bisect", "calendar", "collections", "configparser",
                   "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email",
                   "enum", "fractions", "functools", "glob", "gzip", "hashlib", "heapq", "hmac", "html",
                   "http.client", "inspect", "io", "ipaddress", "itertools", "json", "logging", "math",
                   "mimetypes", "operator", "os", "pathlib", "pprint", "queue", "random", "re", "sched",
                   "shlex", "shutil", "smtplib", "socket", "sqlite3", "statistics", "string", "struct",
                   "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
                   "traceback", "typing", "unittest", "urllib.parse", "uuid", "warnings", "weakref", "zipfile")


@dataclass
class Record:
    tokens: list[int]
    prompt_len: int
    target_start: int
    topk_ids: torch.Tensor  # int32 [len(tokens) - 1 - target_start, k]
    topk_logprobs: torch.Tensor  # float32, same shape


@dataclass
class TeacherData:
    records: list[Record]
    top_k: int
    kind: str
    teacher: str

    def __len__(self) -> int:
        return len(self.records)

    def num_target_tokens(self) -> int:
        return sum(r.topk_ids.shape[0] for r in self.records)

    def split(self, held_out: int, seed: int = 0) -> tuple[TeacherData, TeacherData]:
        """(train, held-out) by a seeded shuffle of the records."""
        if not 0 <= held_out < len(self.records):
            raise ValueError(f"held_out must be in [0, {len(self.records)}), got {held_out}")
        order = list(range(len(self.records)))
        random.Random(seed).shuffle(order)

        def pick(idx: list[int]) -> TeacherData:
            return TeacherData([self.records[i] for i in sorted(idx)], self.top_k, self.kind, self.teacher)

        return pick(order[held_out:]), pick(order[:held_out])


# ---------------------------------------------------------------------------------------------------- prompts

def _paragraphs(text: str) -> list[str]:
    return [re.sub(r"\s+", " ", p).strip() for p in text.split("\n\n") if len(p.strip()) > 120]


def builtin_corpus() -> list[str]:
    """Paragraphs of the docstrings of a fixed list of standard-library modules and their public members."""
    import importlib

    paras: list[str] = []
    for name in _CORPUS_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:  # a Python built without the module (sqlite3, say)
            continue
        docs = [inspect.getdoc(mod) or ""]
        for attr in sorted(getattr(mod, "__all__", None) or [a for a in vars(mod) if not a.startswith("_")]):
            obj = getattr(mod, attr, None)
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == mod.__name__:
                docs.append(inspect.getdoc(obj) or "")
        for d in docs:
            paras += _paragraphs(d)
    return paras


def builtin_prompts(n: int, seed: int = 0, min_chars: int = 200, max_chars: int = 1000) -> list[dict[str, Any]]:
    """``n`` prompts ``{"messages": [...], "prompt": text}`` over the built-in corpus: a run of paragraphs and a
    task (repeat, summarize, explain, ...), seeded."""
    paras = builtin_corpus()
    if not paras:
        raise ValueError("the built-in corpus is empty (no standard-library docstrings found)")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        chars, start, text = rng.randint(min_chars, max_chars), rng.randrange(len(paras)), ""
        while len(text) < chars:
            text += ("\n\n" if text else "") + paras[start % len(paras)]
            start += 1
        content = f"{text[:chars]}\n\n{rng.choice(_TASKS)}"
        out.append({"messages": [{"role": "user", "content": content}], "prompt": content})
    return out


def prompts_from_file(path: str) -> list[dict[str, Any]]:
    """Prompts from a ``.jsonl`` file (one object per line with ``"prompt"`` text or chat ``"messages"``) or a
    text file (prompts separated by blank lines)."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if not path.endswith(".jsonl"):
        out = [{"prompt": p.strip()} for p in text.split("\n\n") if p.strip()]
    else:
        out = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not JSON ({e})") from e
            if not isinstance(obj, dict) or not (isinstance(obj.get("prompt"), str) or
                                                 isinstance(obj.get("messages"), list)):
                raise ValueError(f"{path}:{i}: each line needs a 'prompt' string or a 'messages' list")
            out.append(obj)
    if not out:
        raise ValueError(f"{path} holds no prompts")
    return out


def encode_prompts(llm: Any, prompts: Sequence[dict[str, Any]], max_len: int, chat: str = "alternate",
                   ) -> list[list[int]]:
    """Token ids of each prompt (its last ``max_len`` tokens). ``chat``: ``"always"`` applies the model's chat
    template to ``messages`` (or the prompt as one user turn), ``"never"`` encodes the text, ``"alternate"``
    (default) does each to every other prompt when the tokenizer has a chat template (drafts serve both)."""
    if chat not in ("always", "never", "alternate"):
        raise ValueError(f"chat must be always, never or alternate, got {chat!r}")
    tok = llm.get_tokenizer()
    has_template = bool(getattr(tok, "chat_template", None))
    out = []
    for i, p in enumerate(prompts):
        messages = p.get("messages") or [{"role": "user", "content": p["prompt"]}]
        text = p.get("prompt") or "\n\n".join(m["content"] for m in messages)
        use_chat = has_template and (chat == "always" or (chat == "alternate" and i % 2 == 0))
        ids = llm.chat_prompt(messages)["prompt_token_ids"] if use_chat else tok.encode(text)
        if len(ids) >= 2:
            out.append(list(ids)[-max_len:])
    return out


# --------------------------------------------------------------------------------------------- generation

def _top_k(entries: dict[int, Any], k: int, where: str) -> tuple[list[int], list[float]]:
    ranked = sorted(entries.items(), key=lambda kv: -kv[1].logprob)[:k]
    if len(ranked) < k:
        raise ValueError(f"the engine returned {len(ranked)} logprobs at {where}, fewer than top_k={k}")
    return [t for t, _ in ranked], [lp.logprob for _, lp in ranked]


def _record(tokens: list[int], prompt_len: int, rows: list[dict[int, Any]], target_start: int, k: int) -> Record:
    ids, lps = zip(*(_top_k(r, k, f"position {target_start + i}") for i, r in enumerate(rows))) if rows else ((), ())
    shape = (len(rows), k)
    return Record(tokens, prompt_len, target_start, torch.tensor(ids, dtype=torch.int32).view(shape),
                  torch.tensor(lps, dtype=torch.float32).view(shape))


def _check_k(top_k: int) -> None:
    from fastinfer.sampling_params import MAX_LOGPROBS

    if not 1 <= top_k <= MAX_LOGPROBS:
        raise ValueError(f"top_k must be in [1, {MAX_LOGPROBS}] (the engine's MAX_LOGPROBS), got {top_k}")


def generate_off_policy(teacher: Any, prompts: Sequence[list[int]], max_tokens: int, top_k: int = 20,
                        temperature: float = 0.0, seed: int = 0, score_prompt: bool = False,
                        ignore_eos: bool = False, use_tqdm: bool = True) -> list[Record]:
    """The teacher ``LLM`` generates from every prompt (token ids) with its top-``top_k`` logprobs per token;
    ``score_prompt`` also keeps the teacher's distribution over the prompt positions; ``ignore_eos`` generates
    ``max_tokens`` whatever (as the speculative benchmarks measure)."""
    from fastinfer.sampling_params import SamplingParams

    _check_k(top_k)
    sps = [SamplingParams(temperature=temperature, max_tokens=max_tokens, logprobs=top_k, seed=seed + i,
                          prompt_logprobs=top_k if score_prompt else None, ignore_eos=ignore_eos)
           for i in range(len(prompts))]
    outs = teacher.generate([{"prompt_token_ids": p} for p in prompts], sps, use_tqdm=use_tqdm)
    records = []
    for p, o in zip(prompts, outs):
        if o.error:
            raise ValueError(f"the teacher failed on a prompt of {len(p)} tokens: {o.error}")
        comp = o.outputs[0]
        if not comp.token_ids:
            continue
        rows = list(comp.logprobs or [])
        start = len(p) - 1
        if score_prompt:
            rows = list(o.prompt_logprobs[1:]) + rows
            start = 0
        records.append(_record(list(p) + list(comp.token_ids), len(p), rows, start, top_k))
    return records


def score(teacher: Any, sequences: Sequence[tuple[list[int], int]], top_k: int = 20, score_prompt: bool = False,
          use_tqdm: bool = True) -> list[Record]:
    """The teacher ``LLM``'s top-``top_k`` distribution over each (tokens, prompt length): every position after
    the prompt (and over the prompt with ``score_prompt``)."""
    from fastinfer.sampling_params import SamplingParams

    _check_k(top_k)
    sp = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=top_k)
    outs = teacher.generate([{"prompt_token_ids": t} for t, _ in sequences], sp, use_tqdm=use_tqdm)
    records = []
    for (tokens, plen), o in zip(sequences, outs):
        if o.error:
            raise ValueError(f"the teacher failed to score a sequence of {len(tokens)} tokens: {o.error}")
        start = 0 if score_prompt else plen - 1
        records.append(_record(list(tokens), plen, list(o.prompt_logprobs[1 + start:]), start, top_k))
    return records


def generate_on_policy(student: Any, teacher: Any, prompts: Sequence[list[int]], max_tokens: int,
                       top_k: int = 20, temperature: float = 1.0, seed: int = 0, use_tqdm: bool = True,
                       ) -> list[Record]:
    """The student ``LLM`` generates from every prompt; the teacher scores prompt + completion."""
    from fastinfer.sampling_params import SamplingParams

    sps = [SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed + i) for i in range(len(prompts))]
    outs = student.generate([{"prompt_token_ids": p} for p in prompts], sps, use_tqdm=use_tqdm)
    seqs = [(list(p) + list(o.outputs[0].token_ids), len(p)) for p, o in zip(prompts, outs)
            if not o.error and o.outputs[0].token_ids]
    return score(teacher, seqs, top_k, use_tqdm=use_tqdm)


# ------------------------------------------------------------------------------------------------ file I/O

def save(path: str, data: TeacherData) -> None:
    """Write ``data`` as one safetensors file (atomically: a temporary file renamed)."""
    from safetensors.torch import save_file

    recs = data.records
    lens = [len(r.tokens) for r in recs]
    offsets = torch.zeros(len(recs) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lens, dtype=torch.int64).cumsum(0)
    k = data.top_k
    tensors = {
        "tokens": torch.tensor([t for r in recs for t in r.tokens], dtype=torch.int32),
        "offsets": offsets,
        "prompt_lens": torch.tensor([r.prompt_len for r in recs], dtype=torch.int64),
        "target_starts": torch.tensor([r.target_start for r in recs], dtype=torch.int64),
        "topk_ids": torch.cat([r.topk_ids for r in recs]) if recs else torch.zeros(0, k, dtype=torch.int32),
        "topk_logprobs": (torch.cat([r.topk_logprobs for r in recs]) if recs
                          else torch.zeros(0, k, dtype=torch.float32)),
    }
    meta = {"format": FORMAT, "version": VERSION, "top_k": str(k), "kind": data.kind, "teacher": data.teacher}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    save_file({n: t.contiguous() for n, t in tensors.items()}, tmp, metadata=meta)
    os.replace(tmp, path)


def load(path: str, vocab_size: int | None = None) -> TeacherData:
    """Read a file written by :func:`save`, checking its structure (a corrupt or foreign file is a
    ``ValueError`` naming what is wrong); ``vocab_size`` also range-checks the token ids."""
    from safetensors import SafetensorError, safe_open

    def bad(what: str) -> ValueError:
        return ValueError(f"{path}: not valid distillation data: {what}")

    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except (SafetensorError, OSError) as e:
        raise bad(f"cannot read it as safetensors ({e})") from e
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise bad(f"format {meta.get('format')!r} version {meta.get('version')!r}, expected {FORMAT!r} {VERSION}")
    dtypes = {"tokens": torch.int32, "offsets": torch.int64, "prompt_lens": torch.int64,
              "target_starts": torch.int64, "topk_ids": torch.int32, "topk_logprobs": torch.float32}
    for name, dt in dtypes.items():
        if name not in t:
            raise bad(f"missing tensor {name!r}")
        if t[name].dtype != dt:
            raise bad(f"{name} is {t[name].dtype}, expected {dt}")
    try:
        k = int(meta.get("top_k", ""))
    except ValueError:
        raise bad(f"top_k metadata {meta.get('top_k')!r} is not an integer") from None
    return TeacherData(_records(t, k, vocab_size, bad), k, meta.get("kind", ""), meta.get("teacher", ""))


def _records(t: dict[str, torch.Tensor], k: int, vocab_size: int | None, bad: Any) -> list[Record]:
    tokens, offsets, plens, starts = t["tokens"], t["offsets"], t["prompt_lens"], t["target_starts"]
    ids, lps = t["topk_ids"], t["topk_logprobs"]
    n = plens.numel()
    if offsets.dim() != 1 or offsets.numel() != n + 1 or starts.numel() != n or tokens.dim() != 1:
        raise bad("offsets / prompt_lens / target_starts / tokens have inconsistent sizes")
    if int(offsets[0]) != 0 or int(offsets[-1]) != tokens.numel() or bool((offsets[1:] <= offsets[:-1]).any()):
        raise bad("offsets are not increasing from 0 to the number of tokens")
    lens = offsets[1:] - offsets[:-1]
    if bool((plens < 1).any() or (plens > lens).any() or (starts < 0).any() or (starts > lens - 1).any()):
        raise bad("a prompt length or target start lies outside its sequence")
    rows = lens - 1 - starts
    if ids.dim() != 2 or ids.shape != (int(rows.sum()), k) or lps.shape != ids.shape:
        raise bad(f"topk_ids / topk_logprobs must be [{int(rows.sum())}, {k}], got {tuple(ids.shape)} / "
                  f"{tuple(lps.shape)}")
    hi = vocab_size if vocab_size is not None else 2 ** 31 - 1
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= hi):
        raise bad(f"token ids outside [0, {hi})")
    if ids.numel():
        if int(ids.min()) < 0 or int(ids.max()) >= hi:
            raise bad(f"top-k ids outside [0, {hi})")
        s = ids.sort(-1).values
        if bool((s[:, 1:] == s[:, :-1]).any()):
            raise bad("a position repeats a top-k id")
        if not bool(torch.isfinite(lps).all()) or float(lps.max()) > 1e-3 or \
                float(torch.logsumexp(lps, -1).max()) > 1e-3:
            raise bad("top-k logprobs must be finite log-probabilities summing to at most 1")
    out, r0 = [], 0
    for i in range(n):
        a, b, r = int(offsets[i]), int(offsets[i + 1]), int(rows[i])
        out.append(Record(tokens[a:b].tolist(), int(plens[i]), int(starts[i]), ids[r0:r0 + r], lps[r0:r0 + r]))
        r0 += r
    return out
