"""Tool-call parsers: find the function calls in a model's output text, all at once or while it streams.

One parser instance per choice. ``feed(delta)`` returns what may be sent now (content text and call deltas: the
first delta of a call carries its name, later ones fragments of its arguments' JSON text); text that may still
become a tool-call marker is held back until it cannot. ``finish()`` flushes. ``parse(text)`` is the same
machine fed the whole text, so the streamed deltas of any split of a text concatenate to ``parse`` of it; a call
whose arguments are not valid JSON (a truncated output, say) makes ``parse`` return the whole text as content
and no calls, as vLLM does.

Formats: ``hermes`` (Hermes / Qwen: ``<tool_call>{"name": .., "arguments": {..}}</tool_call>``, repeatable, text
around them is content), ``llama3_json`` (Llama 3: the whole output is ``{"name": .., "parameters": {..}}``,
possibly after ``<|python_tag|>``, several separated by ``;``), ``mistral`` (``[TOOL_CALLS] [{"name": ..,
"arguments": {..}}, ...]`` after optional content). ``JsonArrayCalls`` reads the output that
``tool_choice="required"``'s grammar forces (a JSON array of ``{"name", "parameters"}``). Adding a format: a
subclass setting the delimiters below, plus one line in ``TOOL_PARSERS``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

_WS = " \t\r\n"


@dataclass
class CallDelta:
    index: int
    name: str | None = None  # set on the first delta of a call only
    arguments: str = ""


@dataclass
class ParsedDelta:
    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)

    def add(self, other: ParsedDelta) -> None:
        self.content += other.content
        for c in other.calls:
            if c.name is None and not c.arguments:
                continue
            last = self.calls[-1] if self.calls else None
            if last is not None and last.index == c.index and c.name is None:
                last.arguments += c.arguments
            else:
                self.calls.append(CallDelta(c.index, c.name, c.arguments))


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text


@dataclass
class ParsedTools:
    content: str  # the text outside the calls (possibly empty)
    calls: list[ToolCall]


def collect_calls(deltas: list[CallDelta]) -> list[ToolCall]:
    """The calls that a sequence of call deltas adds up to, in index order."""
    calls: dict[int, ToolCall] = {}
    for c in deltas:
        if c.name is not None:
            calls[c.index] = ToolCall(c.name, "")
        calls[c.index].arguments += c.arguments
    return [calls[i] for i in sorted(calls)]


def is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def held_back(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker`` (may still become it)."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


class _JsonEnd:
    """Finds where one JSON value ends, fed piece by piece: tracks strings, escapes and nesting only."""

    def __init__(self, inside_container: bool = False) -> None:
        self.depth = 1 if inside_container else 0
        self.started = inside_container
        self.in_str = self.esc = self.scalar = False

    def feed(self, s: str) -> int | None:
        """Index in ``s`` just past the value's end, or None when it has not ended yet."""
        for i, ch in enumerate(s):
            if not self.started:
                self.started = True
                if ch in "{[":
                    self.depth = 1
                elif ch == '"':
                    self.in_str = True
                else:
                    self.scalar = True
            elif self.in_str:
                if self.esc:
                    self.esc = False
                elif ch == "\\":
                    self.esc = True
                elif ch == '"':
                    self.in_str = False
                    if self.depth == 0:
                        return i + 1
            elif self.scalar:
                if ch in ",}]" + _WS:
                    return i
            elif ch == '"':
                self.in_str = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        return None


_PARTIAL = "partial"


def _match_head(buf: str, arg_keys: tuple[str, ...]) -> tuple[str, int] | str | None:
    """Match ``{"name": "<name>", "<arg key>": `` at the start of ``buf``: (name, index of the arguments value),
    ``_PARTIAL`` while ``buf`` may still become such a head, None when it cannot."""
    pos = 0

    def ws() -> None:
        nonlocal pos
        while pos < len(buf) and buf[pos] in _WS:
            pos += 1

    def lit(options: tuple[str, ...]) -> bool | str:
        nonlocal pos
        rest = buf[pos:]
        for o in options:
            if rest.startswith(o):
                pos += len(o)
                return True
        return _PARTIAL if any(o.startswith(rest) for o in options) else False

    for step in ("{", '"name"', ":", "string", ",", "key", ":"):
        ws()
        if pos >= len(buf):
            return _PARTIAL
        if step == "string":
            if buf[pos] != '"':
                return None
            end = _JsonEnd()
            n = end.feed(buf[pos:])
            if n is None:
                return _PARTIAL
            try:
                name = json.loads(buf[pos:pos + n])
            except ValueError:
                return None
            pos += n
            continue
        got = lit(tuple(f'"{k}"' for k in arg_keys) if step == "key" else (step,))
        if got is not True:
            return got or None
    ws()
    return (name, pos) if pos < len(buf) else _PARTIAL


class _CallObject:
    """One ``{"name": .., "arguments": ..}`` object, streamed: the name once the head is complete, then the raw
    text of the arguments value as it arrives. An object of another shape is read whole and kept if it still
    names a function and has arguments (other key order), else handed back as content."""

    def __init__(self, index: int, arg_keys: tuple[str, ...]) -> None:
        self.index, self.arg_keys = index, arg_keys
        self.mode = "head"
        self.text = ""  # head text, or the whole object's text in "whole" mode
        self.value: _JsonEnd = _JsonEnd()
        self.out = ParsedDelta()
        self.is_call = False

    def feed(self, s: str) -> str | None:
        """Consume ``s``; the text after the object's end, or None while the object goes on."""
        if self.mode == "head":
            self.text += s
            head = _match_head(self.text, self.arg_keys)
            if head == _PARTIAL:
                return None
            if head is None:
                self.mode, s, self.text, self.value = "whole", self.text, "", _JsonEnd()
            else:
                assert isinstance(head, tuple)
                name, pos = head
                self.out.calls.append(CallDelta(self.index, name=name))
                self.is_call = True
                self.mode, s, self.text = "args", self.text[pos:], ""
        if self.mode == "args":
            i = self.value.feed(s)
            self.out.calls.append(CallDelta(self.index, arguments=s if i is None else s[:i]))
            if i is None:
                return None
            self.mode, s, self.value = "tail", s[i:], _JsonEnd(inside_container=True)
        if self.mode == "tail":
            i = self.value.feed(s)
            return None if i is None else s[i:]
        i = self.value.feed(s)  # "whole"
        self.text += s if i is None else s[:i]
        if i is None:
            return None
        self._whole_object()
        return s[i:]

    def _whole_object(self) -> None:
        try:
            obj = json.loads(self.text)
        except ValueError:
            obj = None
        key = next((k for k in self.arg_keys if isinstance(obj, dict) and k in obj), None)
        if isinstance(obj, dict) and isinstance(obj.get("name"), str) and key is not None:
            self.is_call = True
            self.out.calls.append(CallDelta(self.index, obj["name"], json.dumps(obj[key], ensure_ascii=False)))
        else:
            self.out.content += self.text

    def finish(self) -> None:
        if self.mode in ("head", "whole"):
            self.out.content += self.text

    def take(self) -> ParsedDelta:
        out, self.out = self.out, ParsedDelta()
        return out


class ToolParser:
    """The streaming machine; subclasses set the format's delimiters."""

    name: ClassVar[str]
    opener: ClassVar[str | None] = None  # marker that starts calls (in text, or only at the very start)
    leading_only: ClassVar[bool] = False  # calls only at the start of the output (else text may come first)
    open_list: ClassVar[str | None] = None  # "[" when the calls form a JSON array
    separator: ClassVar[str | None] = None  # between calls
    closer: ClassVar[str | None] = None  # after the calls (or after each call, with opener and no list)
    repeatable: ClassVar[bool] = False  # text and more calls may follow the closer
    arg_keys: ClassVar[tuple[str, ...]] = ("arguments", "parameters")
    template_markers: ClassVar[tuple[str, ...]] = ()  # a chat template containing one of these uses this format
    special_markers: ClassVar[tuple[str, ...]] = ()  # markers that may be special tokens of the vocabulary

    def __init__(self) -> None:
        # states: start (leading_only: before anything), text (content; the opener may come), opened (after the
        # opener), item (a call object expected), object (inside one), after (separator or closer), tail (content)
        self.state = "start" if self.leading_only else "text"
        self.buf = ""
        self.marker = ""  # syntax consumed since the opener or the last call: content if no call follows
        self.called = False  # a call came after the last opener
        self.num_calls = 0
        self.in_list = False
        self.obj: _CallObject | None = None
        self.out = ParsedDelta()

    # -- public -----------------------------------------------------------------------------------------
    def feed(self, delta: str) -> ParsedDelta:
        self.buf += delta
        while self._step():
            pass
        return self._take()

    def finish(self) -> ParsedDelta:
        if self.state == "object" and self.obj is not None:
            self.obj.finish()
            self._take_object()
        elif self.state in ("text", "start", "tail") or not self.called:
            self.out.content += self.marker + self.buf  # e.g. a marker that no call followed
        self.buf, self.state = "", "done"
        return self._take()

    @classmethod
    def parse(cls, text: str) -> ParsedTools:
        p = cls()
        out = p.feed(text)
        out.add(p.finish())
        calls = collect_calls(out.calls)
        if not all(is_json(c.arguments) for c in calls):
            return ParsedTools(text, [])
        return ParsedTools(out.content, calls)

    # -- the machine ------------------------------------------------------------------------------------
    def _take(self) -> ParsedDelta:
        out, self.out = self.out, ParsedDelta()
        return out

    def _step(self) -> bool:
        """Advance one state; False when more input is needed."""
        s = self.state
        if s == "tail" or s == "text" and (self.opener is None or self.leading_only):
            self.out.content += self.buf
            self.buf = ""
            return False
        if s == "text":
            return self._scan_text()
        if s == "object":
            text, self.buf = self.buf, ""
            return self._object_feed(text)
        t = self.buf.lstrip(_WS)
        if not t:
            return False
        return {"start": self._start, "opened": self._opened, "item": self._item, "after": self._after}[s](t)

    def _scan_text(self) -> bool:
        assert self.opener is not None
        i = self.buf.find(self.opener)
        if i < 0:
            keep = held_back(self.buf, self.opener)
            self.out.content += self.buf[:len(self.buf) - keep]
            self.buf = self.buf[len(self.buf) - keep:]
            return False
        self.out.content += self.buf[:i]
        self.buf, self.called = self.buf[i:], False
        self._consume(len(self.opener), "opened")
        return True

    def _consume(self, n: int, state: str) -> None:
        """Move ``n`` characters of syntax from the buffer into the marker."""
        self.marker += self.buf[:n]
        self.buf, self.state = self.buf[n:], state

    def _to_text(self) -> None:
        """The calls are over: what follows is text (where more calls may open) or plain content."""
        if not self.called:  # syntax that opened no call is content
            self.out.content += self.marker
        self.marker, self.state = "", "text" if self.repeatable else "tail"

    def _start(self, t: str) -> bool:
        ws = len(self.buf) - len(t)
        if self.opener is not None:
            if t.startswith(self.opener):
                self._consume(ws + len(self.opener), "opened")
                return True
            if self.opener.startswith(t):
                return False
        if t[0] in (self.open_list or "{"):
            self._consume(ws, "opened")
        else:
            self.state = "tail"
        return True

    def _opened(self, t: str) -> bool:
        ws = len(self.buf) - len(t)
        if self.open_list is not None and t[0] == self.open_list:
            self.in_list = True
            self._consume(ws + 1, "item")
        elif t[0] == "{":
            self._consume(ws, "item")
        else:  # not calls after all: the marker and what follows are content
            self._to_text()
        return True

    def _item(self, t: str) -> bool:
        self._consume(len(self.buf) - len(t), "after" if t[0] != "{" else "object")
        if self.state == "after":
            return True
        self.obj, self.buf = _CallObject(self.num_calls, self.arg_keys), ""
        return self._object_feed(t)

    def _after(self, t: str) -> bool:
        ws = len(self.buf) - len(t)
        if self.separator is not None and t.startswith(self.separator):
            self._consume(ws + len(self.separator), "item")
            return True
        closer = self.closer if not self.open_list or self.in_list else None
        if closer is not None:
            if t.startswith(closer):
                self._consume(ws + len(closer), "after")
                self._to_text()
                return True
            if closer.startswith(t):
                return False
        self._to_text()
        return True

    def _object_feed(self, text: str) -> bool:
        assert self.obj is not None
        rest = self.obj.feed(text)
        if rest is None:
            self.out.add(self.obj.take())
            return False
        is_call = self.obj.is_call
        self._take_object()
        self.buf, self.state = rest, "after"
        if not is_call:  # an object that is no call: it and the rest are text
            self._to_text()
        return True

    def _take_object(self) -> None:
        assert self.obj is not None
        got = self.obj.take()
        if self.obj.is_call:
            self.num_calls += 1
            self.called, self.marker = True, ""
        elif got.content:  # an object that is no call: content, after the syntax before it
            got.content, self.marker = self.marker + got.content, ""
        self.out.add(got)
        self.obj = None


class HermesToolParser(ToolParser):
    name = "hermes"
    opener, closer, repeatable = "<tool_call>", "</tool_call>", True
    template_markers = ("<tool_call>",)


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    opener, leading_only, separator = "<|python_tag|>", True, ";"
    template_markers = ("<|python_tag|>", "Environment: ipython")
    special_markers = ("<|python_tag|>",)


class MistralToolParser(ToolParser):
    name = "mistral"
    opener, open_list, separator, closer = "[TOOL_CALLS]", "[", ",", "]"
    template_markers = ("[TOOL_CALLS]",)
    special_markers = ("[TOOL_CALLS]",)


class JsonArrayCalls(ToolParser):
    """The output ``tool_choice="required"`` forces: ``[{"name": .., "parameters": {..}}, ...]``."""

    name = "json_array"
    leading_only, open_list, separator, closer = True, "[", ",", "]"


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
}



def detect_tool_parser(chat_template: str | None) -> str | None:
    """The parser whose markers the chat template contains, when exactly one format matches."""
    if not chat_template:
        return None
    found = [n for n, p in TOOL_PARSERS.items() if any(m in chat_template for m in p.template_markers)]
    return found[0] if len(found) == 1 else None


def required_tools_schema(tools: list[dict[str, Any]], single: bool = False) -> dict[str, Any]:
    """JSON schema for ``tool_choice="required"``: a non-empty array (of one item when ``single``) of ``{"name":
    one of the tools, "parameters": that tool's parameters}`` (vLLM's form); ``$defs`` of the tools' schemas are
    lifted to the top level so their references still resolve. Raises ValueError for two different definitions
    under one name."""
    defs: dict[str, Any] = {}
    variants = []
    for t in tools:
        fn = t["function"]
        params = dict(fn.get("parameters") or {"type": "object", "properties": {}})
        for k, v in (params.pop("$defs", None) or {}).items():
            if k in defs and defs[k] != v:
                raise ValueError(f"tools define $defs.{k} differently; rename one")
            defs[k] = v
        variants.append({"properties": {"name": {"type": "string", "enum": [fn["name"]]}, "parameters": params},
                         "required": ["name", "parameters"]})
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": variants}}
    if single:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema
