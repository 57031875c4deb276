"""Structured outputs (JSON schema, JSON object, regex, choice, EBNF grammar) with xgrammar: compiled off the
engine's step thread, matched per request in the worker, applied to the logits as one batched bitmask op
before sampling and verification. See :mod:`fastinfer.structured_output.grammar`."""
from fastinfer.structured_output.grammar import GrammarCompiler, GrammarState, apply_bitmask, new_bitmask

__all__ = ["GrammarCompiler", "GrammarState", "apply_bitmask", "new_bitmask"]
