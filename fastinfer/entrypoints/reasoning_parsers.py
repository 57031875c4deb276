"""Reasoning parsers: split a model's output into its reasoning (``<think> ... </think>``) and the content after it.

One parser instance per choice. ``feed(delta)`` returns (reasoning, content) text that may be sent now; a tail
that may still become ``</think>`` (or a leading ``<think>``) is held back until it cannot. ``finish()`` flushes.
``parse(text)`` is the same machine fed the whole text, so the streamed deltas of any split concatenate to it.

Where the output starts matters: a template that ends the prompt with ``<think>`` (DeepSeek-R1 distills, newer
Qwen3 templates) has the model start inside its reasoning, so everything before ``</think>`` is reasoning (all of
it when ``</think>`` never comes: a truncated thought); otherwise reasoning is a ``<think>`` block at the start
of the output, and an output without one is all content. ``for_request`` picks the start from the prompt and the
request, per parser. Adding a parser: one subclass with its ``for_request`` rule, plus one line in
``REASONING_PARSERS``.
"""
from __future__ import annotations

from typing import Any, ClassVar

from fastinfer.entrypoints.tool_parsers import held_back

_WS = " \t\r\n"


class ReasoningParser:
    name: ClassVar[str]
    start: ClassVar[str] = "<think>"
    end: ClassVar[str] = "</think>"

    def __init__(self, starts_in_reasoning: bool) -> None:
        self.inside = starts_in_reasoning
        self.state = "lead"  # lead (before the first non-space text), reasoning, content
        self.buf = ""

    @classmethod
    def for_request(cls, prompt: str, chat_template_kwargs: dict[str, Any], constrained: bool) -> ReasoningParser:
        """The parser for one request: ``prompt`` is the rendered prompt text; ``constrained`` says a grammar
        shapes the output from its first token (so no reasoning the prompt did not open comes before it)."""
        raise NotImplementedError

    @classmethod
    def prompt_opens_reasoning(cls, prompt: str) -> bool:
        return prompt.rstrip(_WS).endswith(cls.start)

    @classmethod
    def prompt_closes_reasoning(cls, prompt: str) -> bool:
        return prompt.rstrip(_WS).endswith(cls.end)

    def feed(self, delta: str) -> tuple[str, str]:
        """(reasoning, content) to send for this piece of output."""
        self.buf += delta
        reasoning = content = ""
        if self.state == "lead":
            t = self.buf.lstrip(_WS)
            if t != self.start and self.start.startswith(t):  # empty or a proper prefix of the tag: wait
                return "", ""
            if t.startswith(self.start):
                self.buf, self.state = t[len(self.start):], "reasoning"
            else:
                self.state = "reasoning" if self.inside else "content"
        if self.state == "reasoning":
            i = self.buf.find(self.end)
            if i < 0:
                keep = held_back(self.buf, self.end)
                reasoning, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                return reasoning, ""
            reasoning, self.buf, self.state = self.buf[:i], self.buf[i + len(self.end):], "content"
        if self.state == "content":
            content, self.buf = self.buf, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        rest, self.buf = self.buf, ""
        if self.state == "reasoning" or self.state == "lead" and self.inside:
            return rest, ""
        return "", rest

    @classmethod
    def parse_with(cls, parser: ReasoningParser, text: str) -> tuple[str | None, str | None]:
        """(reasoning, content) of a whole output, None where empty."""
        r1, c1 = parser.feed(text)
        r2, c2 = parser.finish()
        return (r1 + r2) or None, (c1 + c2) or None


class DeepSeekR1ReasoningParser(ReasoningParser):
    """DeepSeek-R1 (and its distills): the template opens ``<think>`` (in the prompt or as the model's first
    token), so the output starts in reasoning, unless the prompt closed it, or a grammar shapes the output from
    its first token and the prompt did not open it."""

    name = "deepseek_r1"

    @classmethod
    def for_request(cls, prompt: str, chat_template_kwargs: dict[str, Any], constrained: bool) -> ReasoningParser:
        opened = cls.prompt_opens_reasoning(prompt)
        return cls(not cls.prompt_closes_reasoning(prompt) and (opened or not constrained))


class Qwen3ReasoningParser(ReasoningParser):
    """Qwen3: older templates let the model write ``<think>`` itself, newer ones end the prompt with it;
    ``enable_thinking=False`` (a chat-template kwarg) closes the block in the prompt, so all output is content."""

    name = "qwen3"

    @classmethod
    def for_request(cls, prompt: str, chat_template_kwargs: dict[str, Any], constrained: bool) -> ReasoningParser:
        thinking = chat_template_kwargs.get("enable_thinking", True) is not False
        return cls(thinking and cls.prompt_opens_reasoning(prompt))


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    "deepseek_r1": DeepSeekR1ReasoningParser,
    "qwen3": Qwen3ReasoningParser,
}
