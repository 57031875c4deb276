"""Tokenizers come from HF ``tokenizers``/``transformers``: a directory's tokenizer files, or a GGUF file's
vocabulary and merges converted by transformers' GGUF converter. Never with remote code."""
from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger("fastinfer")


def load_hf_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as e:
        raise ValueError(f"cannot load a tokenizer from {path}: {e}") from e


def tokenizer_from_gguf(gguf_file: Any) -> Any:
    """A fast tokenizer (with chat template) from an opened :class:`GGUFFile`, reusing its parsed metadata."""
    from transformers import PreTrainedTokenizerFast

    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except ImportError:  # other transformers versions: let it read the file itself (slower)
        from transformers import AutoTokenizer

        logger.info("tokenizer: transformers' GGUF converter API not found, using AutoTokenizer(gguf_file=)")
        d, f = os.path.split(os.path.abspath(gguf_file.path))
        return AutoTokenizer.from_pretrained(d, gguf_file=f)
    tok_dict, conf = gguf_file.tokenizer_description()
    backend, _ = convert_gguf_tokenizer(gguf_file.arch, tok_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **conf)
