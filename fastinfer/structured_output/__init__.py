"""Structured outputs (JSON schema, JSON object, regex, choice, EBNF grammar) with xgrammar: compiled off the
engine's step thread, matched per request in the worker, applied to the logits by the op set's
``apply_token_bitmask`` (one batched op) before sampling and verification. See
:mod:`fastinfer.structured_output.grammar`."""
from fastinfer.structured_output.grammar import GrammarCompiler, GrammarState, new_bitmask

__all__ = ["GrammarCompiler", "GrammarState", "new_bitmask"]
