"""Incremental detokenization with stop strings that may span tokens and are never emitted."""
from __future__ import annotations

from typing import Any

from fastinfer.sampling_params import SamplingParams

_CONTEXT = 5  # prompt tokens decoded along with the first outputs, so leading spaces come out right


def _raw_decoder(tokenizer: Any) -> Any:
    """The Rust ``tokenizers`` decode behind a fast HF tokenizer when it gives the same text as
    ``tokenizer.decode`` (no clean-up of tokenization spaces): the HF wrapper costs ~15 us per call on
    argument conversion, paid twice per request per step. None otherwise (the tokenizer's own decode)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return None
    return backend.decode


class IncrementalDetokenizer:
    """Keeps the text of one sample up to date as tokens arrive. ``stop()`` reports a stop string; the
    text is then cut before it (after it with ``include_stop_str_in_output``). While running, the last
    ``len(longest stop) - 1`` characters are held back from ``visible_text`` so a stop string that is
    still being completed never reaches a stream."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tok = tokenizer
        self._raw = _raw_decoder(tokenizer)
        self.params = params
        self.ids = list(prompt_token_ids[-_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.num_context = len(self.ids)
        self.text = ""
        self.stopped_by: str | None = None
        self.hold = max((len(s) for s in params.stop_strings), default=1) - 1

    def _decode(self, ids: list[int]) -> str:
        if self._raw is not None:
            return self._raw(ids, skip_special_tokens=self.params.skip_special_tokens)
        return self.tok.decode(ids, skip_special_tokens=self.params.skip_special_tokens)

    def add(self, token_ids: list[int]) -> None:
        """Append new tokens; sets ``stopped_by`` when a stop string completes."""
        self.ids.extend(token_ids)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return  # an incomplete UTF-8 sequence: wait for more bytes
        old_len = len(self.text)
        self.text += full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self._check_stop(old_len)

    def _check_stop(self, old_len: int) -> None:
        if not self.params.stop_strings:
            return
        start = max(0, old_len - self.hold)
        best = None
        for s in self.params.stop_strings:
            i = self.text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is not None:
            i, s = best
            self.text = self.text[:i + len(s)] if self.params.include_stop_str_in_output else self.text[:i]
            self.stopped_by = s

    def visible_text(self, finished: bool) -> str:
        if finished or not self.hold:
            return self.text
        return self.text[:max(0, len(self.text) - self.hold)]

    def token_text(self, token_id: int) -> str:
        return self.tok.decode([token_id], skip_special_tokens=False)
