"""Incremental detokenization: the text built token by token equals one decode of all tokens, with the
tokenizer's fast (Rust) decode and with its Python ``decode`` (tokenizers that clean up spaces)."""
from __future__ import annotations

import copy

import pytest

from fastinfer import SamplingParams
from fastinfer.engine.detokenizer import IncrementalDetokenizer

TEXT = ("Grüße aus Köln! The café's naïve résumé costs 3.50 €, doesn't it?  Two  spaces, a tab\there, "
        "emoji 🙂🚀 and CJK 漢字 at the end.")


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from fastinfer.models.loader import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.mark.parametrize("clean_up", [False, True])
@pytest.mark.parametrize("chunk", [1, 3])
def test_streamed_text_equals_one_decode(tokenizer, clean_up, chunk):
    tok = copy.copy(tokenizer)
    tok.clean_up_tokenization_spaces = clean_up
    prompt = tok.encode("Say:")
    out = tok.encode(TEXT, add_special_tokens=False)
    d = IncrementalDetokenizer(tok, prompt, SamplingParams(max_tokens=len(out)))
    for i in range(0, len(out), chunk):
        d.add(out[i:i + chunk])
    full = tok.decode(prompt + out, skip_special_tokens=True)
    want = full[len(tok.decode(prompt, skip_special_tokens=True)):]
    assert d.visible_text(finished=True) == want
