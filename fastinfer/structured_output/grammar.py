"""Grammars for structured outputs, compiled by xgrammar against the served tokenizer.

:class:`GrammarCompiler` checks a request's constraint (fast, no tokenizer work: the engine calls it before it
queues the request, so a bad schema is a ``ValueError`` naming the problem) and compiles it into the
token-level automaton xgrammar matches with (the expensive part: the engine runs it off its step thread).
Compiled grammars are kept in an LRU keyed by :meth:`StructuredOutputsParams.key`.

:class:`GrammarState` is one request's position in its grammar: it fills that request's row of the batch's
token bitmask, advances with the tokens the request accepts, and looks ahead through speculative drafts (one
bitmask row per draft position) and back again, so only verified tokens ever advance it.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from fastinfer.sampling_params import StructuredOutputsParams

logger = logging.getLogger("fastinfer")

CACHE_ENTRIES = 128  # compiled grammars kept (LRU)
CACHE_BYTES = 512 << 20  # xgrammar's own cache of intermediate results


def _xgr() -> Any:
    try:
        import xgrammar
    except ImportError as e:  # a dependency of fastinfer: only a broken install lacks it
        raise ValueError("structured outputs need the xgrammar package (pip install xgrammar)") from e
    return xgrammar


def _choice_ebnf(choices: Sequence[str]) -> str:
    """EBNF accepting exactly one of ``choices`` (JSON string escapes are valid EBNF string literals)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class GrammarCompiler:
    """Checks and compiles :class:`StructuredOutputsParams` for one tokenizer. Thread-safe: the engine compiles
    on a background thread while the worker looks grammars up on the step thread."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        self.tokenizer, self.vocab_size, self.stop_token_ids = tokenizer, vocab_size, list(stop_token_ids)
        self._compiler: Any = None
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.num_compiled = 0  # cache misses (for tests and metrics)

    def _get_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                xgr = _xgr()
                t0 = time.perf_counter()
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.stop_token_ids or None)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_limit_bytes=CACHE_BYTES)
                logger.info("structured outputs: xgrammar tokenizer info built in %.2f s (vocab %d, stop ids %s)",
                            time.perf_counter() - t0, self.vocab_size, self.stop_token_ids)
            return self._compiler

    def check(self, p: StructuredOutputsParams) -> None:
        """Parse the schema / regex / grammar without compiling it against the vocabulary; ValueError naming
        the problem when it is invalid or uses what xgrammar does not support."""
        _grammar(p)

    def compile(self, p: StructuredOutputsParams) -> Any:
        """The compiled grammar of ``p`` (an ``xgrammar.CompiledGrammar``), from the cache when compiled before."""
        key = p.key()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        compiler = self._get_compiler()
        t0 = time.perf_counter()
        grammar = _grammar(p)
        try:
            compiled = compiler.compile_grammar(grammar)
        except (RuntimeError, ValueError, TypeError) as e:
            raise ValueError(f"invalid structured_outputs.{p.kind}: {_clean(e)}") from None
        logger.debug("structured outputs: compiled a %s grammar in %.1f ms", p.kind,
                     1e3 * (time.perf_counter() - t0))
        with self._lock:
            self.num_compiled += 1
            self._cache[key] = compiled
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return compiled

    def token_ids(self, text: str) -> list[int]:
        """``text`` as the tokenizer encodes it (no special tokens added)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))


def _grammar(p: StructuredOutputsParams) -> Any:
    """The ``xgrammar.Grammar`` of a constraint (parsing only, no vocabulary work); ValueError naming the problem
    when the schema / regex / grammar is invalid or uses what xgrammar does not support."""
    xgr = _xgr()
    kind = p.kind
    try:
        if kind in ("json", "json_object"):
            schema = ({"type": "object"} if kind == "json_object" else
                      json.loads(p.json) if isinstance(p.json, str) else p.json)
            if not isinstance(schema, (dict, bool)):
                raise ValueError("a JSON schema must be an object")
            return xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=not p.disable_any_whitespace)
        if kind == "regex":
            return xgr.Grammar.from_regex(p.regex)
        return xgr.Grammar.from_ebnf(_choice_ebnf(p.choice or []) if kind == "choice" else p.grammar)
    except json.JSONDecodeError as e:
        raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
    except (RuntimeError, ValueError, TypeError) as e:
        raise ValueError(f"invalid structured_outputs.{kind}: {_clean(e)}") from None


def _clean(e: Exception) -> str:
    """xgrammar's message without its C++ source location prefix (``[time] file.cc:123: ``)."""
    msg = str(e).strip()
    if msg.startswith("["):
        _, _, rest = msg.partition("] ")
        head, sep, tail = rest.partition(": ")
        msg = tail if sep and (".cc:" in head or ".h:" in head) else rest
    return msg.splitlines()[0] if msg else type(e).__name__


class GrammarState:
    """One request's matcher (xgrammar's matchers roll back any number of tokens). With ``start_ids`` (the
    tokens of a reasoning block's end tag) the grammar applies only after the output has produced them: until
    then every token is allowed and the matcher stays at its start."""

    def __init__(self, compiled: Any, start_ids: Sequence[int] | None = None) -> None:
        self.matcher = _xgr().GrammarMatcher(compiled)
        self.start_ids = list(start_ids or [])
        self.waiting = bool(self.start_ids)
        self.recent: list[int] = []  # the last tokens while waiting (as many as the end tag has)

    def _ends_tag(self, tokens: list[int]) -> bool:
        n = len(self.start_ids)
        return len(tokens) >= n and tokens[-n:] == self.start_ids

    def accept(self, tokens: Sequence[int]) -> bool:
        """Advance with generated tokens; False (and the matcher stops there) when one is not allowed."""
        for t in tokens:
            if self.waiting:
                self.recent = (self.recent + [int(t)])[-len(self.start_ids):]
                self.waiting = not self._ends_tag(self.recent)
                continue
            if self.matcher.is_terminated():
                return False
            if not self.matcher.accept_token(int(t)):
                logger.warning("structured outputs: token %d is not allowed by the request's grammar", t)
                return False
        return True

    @property
    def is_terminated(self) -> bool:
        return bool(self.matcher.is_terminated())

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """The allowed next tokens into ``bitmask[row]`` (all allowed before the grammar starts and once it has
        terminated)."""
        if self.waiting or self.matcher.is_terminated():
            bitmask[row].fill_(-1)
        else:
            self.matcher.fill_next_token_bitmask(bitmask, row)

    def fill_with_draft(self, bitmask: torch.Tensor, first_row: int, draft: Sequence[int]) -> None:
        """Rows ``first_row .. first_row + len(draft)``: the allowed tokens before each draft token and after the
        last, looking ahead through the draft; the matcher is rolled back afterwards. Rows past a draft token the
        grammar rejects allow everything (verification stops at that token anyway: its probability is 0). While
        the grammar waits for its start tag, rows up to the draft token completing it allow everything."""
        if self.waiting:
            recent, skip = list(self.recent), len(draft) + 1
            for j, t in enumerate(draft):
                recent = (recent + [int(t)])[-len(self.start_ids):]
                if self._ends_tag(recent):
                    skip = j + 1
                    break
            bitmask[first_row:first_row + skip].fill_(-1)
            if skip <= len(draft):  # the tag completes inside the draft: the grammar starts after it
                self.waiting = False
                self.fill_with_draft(bitmask, first_row + skip, draft[skip:])
                self.waiting = True
            return
        self.fill(bitmask, first_row)
        advanced = 0
        for j, t in enumerate(draft):
            if self.matcher.is_terminated() or not self.matcher.accept_token(int(t)):
                bitmask[first_row + j + 1:first_row + len(draft) + 1].fill_(-1)
                break
            advanced += 1
            self.fill(bitmask, first_row + j + 1)
        if advanced:
            self.matcher.rollback(advanced)


def new_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """An all-allowed int32 token bitmask [rows, ceil(vocab / 32)] on the CPU (xgrammar's layout)."""
    return _xgr().allocate_token_bitmask(rows, vocab_size)
