"""One chat choice's output text -> the assistant message: the reasoning split first (``reasoning_parsers``), then
the tool calls in the content (``tool_parsers``), streamed (``feed`` / ``finish`` -> deltas in OpenAI's shape) or
whole (``message``). Both run the same machines, so a stream's deltas add up to the whole message."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from fastinfer.entrypoints.reasoning_parsers import ReasoningParser
from fastinfer.entrypoints.tool_parsers import CallDelta, ParsedDelta, ToolParser, collect_calls, is_json


class NamedCall:
    """``tool_choice`` naming a function: the grammar-forced output is that function's arguments."""

    def __init__(self, name: str) -> None:
        self.name, self.started = name, False

    def feed(self, delta: str) -> ParsedDelta:
        if not delta:
            return ParsedDelta()
        first, self.started = not self.started, True
        return ParsedDelta(calls=[CallDelta(0, self.name if first else None, delta)])

    def finish(self) -> ParsedDelta:
        return ParsedDelta() if self.started else ParsedDelta(calls=[CallDelta(0, self.name, "")])


@dataclass
class MessageDelta:
    reasoning: str = ""
    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)

    def add(self, other: MessageDelta) -> None:
        self.reasoning += other.reasoning
        merged = ParsedDelta(self.content, self.calls)
        merged.add(ParsedDelta(other.content, other.calls))
        self.content, self.calls = merged.content, merged.calls


class ChoiceOutput:
    """The parsers of one choice. ``validate``: auto / required calls whose arguments are not JSON make the whole
    message plain content (as vLLM does); a named call is kept as generated. ``single_call``
    (``parallel_tool_calls=false``): only the first call is returned."""

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolParser | NamedCall | None,
                 single_call: bool = False) -> None:
        self.reasoning, self.tools, self.single_call = reasoning, tools, single_call
        self.validate = isinstance(tools, ToolParser)
        self.content_in = ""  # the content part (after reasoning), for the fallback
        self.ids: dict[int, str] = {}

    def call_id(self, index: int) -> str:
        if index not in self.ids:
            self.ids[index] = f"call_{uuid.uuid4().hex[:24]}"
        return self.ids[index]

    def _content(self, reasoning: str, content: str, last: bool) -> MessageDelta:
        self.content_in += content
        if self.tools is None:
            return MessageDelta(reasoning, content)
        d = self.tools.feed(content)
        if last:
            d.add(self.tools.finish())
        calls = [c for c in d.calls if c.index == 0] if self.single_call else d.calls
        return MessageDelta(reasoning, d.content, calls)

    def feed(self, delta: str) -> MessageDelta:
        r, c = self.reasoning.feed(delta) if self.reasoning is not None else ("", delta)
        return self._content(r, c, last=False)

    def finish(self) -> MessageDelta:
        r, c = self.reasoning.finish() if self.reasoning is not None else ("", "")
        return self._content(r, c, last=True)

    def message(self, text: str) -> tuple[dict[str, Any], bool]:
        """The whole assistant message for ``text``, and whether it holds tool calls."""
        d = self.feed(text)
        d.add(self.finish())
        calls = collect_calls(d.calls)
        content: str | None = d.content
        if self.validate and not all(is_json(c.arguments) for c in calls):
            calls, content = [], self.content_in
        msg: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            msg["tool_calls"] = [{"id": self.call_id(i), "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}}
                                 for i, c in enumerate(calls)]
            if not (content or "").strip():
                msg["content"] = None
        if self.reasoning is not None:
            msg["reasoning"] = msg["reasoning_content"] = d.reasoning or None
            if not content:
                msg["content"] = None
        return msg, bool(calls)

    def delta(self, d: MessageDelta) -> dict[str, Any] | None:
        """The chunk's ``delta`` for these parts, or None when there is nothing to send."""
        out: dict[str, Any] = {}
        if d.reasoning:
            out["reasoning"] = out["reasoning_content"] = d.reasoning
        if d.content:
            out["content"] = d.content
        if d.calls:
            out["tool_calls"] = [self._call_delta(c) for c in d.calls]
        return out or None

    def _call_delta(self, c: CallDelta) -> dict[str, Any]:
        if c.name is None:
            return {"index": c.index, "function": {"arguments": c.arguments}}
        return {"index": c.index, "id": self.call_id(c.index), "type": "function",
                "function": {"name": c.name, "arguments": c.arguments}}


def finish_reason(engine_reason: str | None, tool_mode: str, called: bool) -> str | None:
    """OpenAI's: "tool_calls" when auto / required calls ended the output; a named call keeps "stop"."""
    if called and engine_reason == "stop" and tool_mode in ("auto", "required"):
        return "tool_calls"
    return engine_reason
