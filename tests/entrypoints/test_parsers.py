"""Tool-call and reasoning parsers: the calls and arguments found in outputs built from known calls, and the
streamed deltas of every split of each output (every boundary, char by char, sampled 3-way splits) adding up to
the whole-output result."""
from __future__ import annotations

import json
import random

import pytest

from fastinfer.entrypoints.chat_output import ChoiceOutput, MessageDelta, NamedCall, finish_reason
from fastinfer.entrypoints.reasoning_parsers import (
    REASONING_PARSERS,
    DeepSeekR1ReasoningParser,
    Qwen3ReasoningParser,
    ReasoningParser,
)
from fastinfer.entrypoints.tool_parsers import (
    TOOL_PARSERS,
    HermesToolParser,
    JsonArrayCalls,
    Llama3JsonToolParser,
    MistralToolParser,
    ParsedDelta,
    collect_calls,
    detect_tool_parser,
)

CALLS = [("get_weather", {"city": "Paris", "unit": "celsius", "days": [1, 2.5, -3e2]}),
         ("search", {"query": 'a "quoted" } ] </tool_call> ; , [TOOL_CALLS] text\\n', "nested": {"x": {"y": []}}}),
         ("noop", {}),
         ("uni", {"t": "caf\u00e9 \u2603 \\u00e9"})]


def hermes(calls, before="Let me check.\n", key="arguments"):
    body = "".join(f'<tool_call>\n{json.dumps({"name": n, key: a})}\n</tool_call>\n' for n, a in calls)
    return before + body


def llama3(calls, tag=True):
    return ("<|python_tag|>" if tag else "") + "; ".join(json.dumps({"name": n, "parameters": a}) for n, a in calls)


def mistral(calls, before="Sure. "):
    return before + "[TOOL_CALLS] " + json.dumps([{"name": n, "arguments": a} for n, a in calls])


def required(calls):
    return json.dumps([{"name": n, "parameters": a} for n, a in calls], indent=1)


def _stream(parser, pieces):
    out = ParsedDelta()
    for p in pieces:
        out.add(parser.feed(p))
    out.add(parser.finish())
    names = [c.index for c in out.calls if c.name is not None]
    assert len(names) == len(set(names)), "a call's name is sent once"
    return out.content, [(c.name, c.arguments) for c in collect_calls(out.calls)]


def _splits(text, three_way=60):
    yield list(text)
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    rng = random.Random(len(text))
    for _ in range(three_way):
        i, j = sorted(rng.randrange(len(text) + 1) for _ in range(2))
        yield [text[:i], text[i:j], text[j:]]


CASES = [
    (HermesToolParser, hermes(CALLS), "Let me check.\n", CALLS),
    (HermesToolParser, hermes(CALLS[:1], before=""), "", CALLS[:1]),
    (HermesToolParser, hermes(CALLS[1:2], before="", key="parameters") + "Done.", "Done.", CALLS[1:2]),
    (Llama3JsonToolParser, llama3(CALLS), "", CALLS),
    (Llama3JsonToolParser, "  " + llama3(CALLS[:2], tag=False), "", CALLS[:2]),
    (MistralToolParser, mistral(CALLS), "Sure. ", CALLS),
    (MistralToolParser, mistral(CALLS[2:3], before=""), "", CALLS[2:3]),
    (JsonArrayCalls, required(CALLS), "", CALLS),
]


@pytest.mark.parametrize("cls,text,content,calls", CASES, ids=[f"{c[0].name}-{i}" for i, c in enumerate(CASES)])
def test_parser_finds_the_calls_and_streams_the_same(cls, text, content, calls):
    got = cls.parse(text)
    assert got.content.strip() == content.strip()  # the text outside the calls, newlines between them too
    assert [c.name for c in got.calls] == [n for n, _ in calls]
    assert [json.loads(c.arguments) for c in got.calls] == [a for _, a in calls]
    want = (got.content, [(c.name, c.arguments) for c in got.calls])
    for pieces in _splits(text):
        assert _stream(cls(), pieces) == want, pieces


PLAIN = [
    (HermesToolParser, "No tools needed: the answer is 4. <tool_ is not a tag"),
    (HermesToolParser, "text <tool_call>not json</tool_call> more"),
    (HermesToolParser, 'x <tool_call>{"answer": 42}</tool_call>'),  # JSON, but no call
    (Llama3JsonToolParser, "The capital is Paris."),
    (Llama3JsonToolParser, '{"answer": 42}'),
    (MistralToolParser, "plain [TOOL_CALL text"),
    (JsonArrayCalls, "not an array"),
]


@pytest.mark.parametrize("cls,text", PLAIN, ids=[f"{c[0].name}-{i}" for i, c in enumerate(PLAIN)])
def test_no_calls_is_all_content(cls, text):
    got = cls.parse(text)
    assert got.calls == [] and got.content == text
    for pieces in _splits(text, three_way=20):
        assert _stream(cls(), pieces) == (text, [])


@pytest.mark.parametrize("cls,text", [(HermesToolParser, hermes(CALLS[:2])), (MistralToolParser, mistral(CALLS)),
                                      (Llama3JsonToolParser, llama3(CALLS[:1])), (JsonArrayCalls, required(CALLS))])
def test_truncated_call_is_content_when_whole(cls, text):
    cut = text[:text.rindex('"') - 1]  # inside the last call's arguments
    got = cls.parse(cut)
    assert got.calls == [] and got.content == cut


def test_key_order_and_fallback():
    # "arguments" before "name": read whole, still a call
    text = '<tool_call>{"arguments": {"a": [1, {"b": "}"}]}, "name": "f"}</tool_call>'
    got = HermesToolParser.parse(text)
    assert [(c.name, json.loads(c.arguments)) for c in got.calls] == [("f", {"a": [1, {"b": "}"}]})]
    for pieces in _splits(text):
        assert _stream(HermesToolParser(), pieces) == (got.content, [("f", got.calls[0].arguments)])


def test_detect_from_template():
    assert detect_tool_parser("{% for t in tools %}<tool_call>{{ t }}</tool_call>{% endfor %}") == "hermes"
    assert detect_tool_parser("[AVAILABLE_TOOLS] ... [TOOL_CALLS]") == "mistral"
    assert detect_tool_parser("Environment: ipython <|python_tag|>") == "llama3_json"
    assert detect_tool_parser("{{ messages }}") is None and detect_tool_parser(None) is None
    assert detect_tool_parser("<tool_call> and [TOOL_CALLS]") is None  # ambiguous: no guess
    assert set(TOOL_PARSERS) == {"hermes", "llama3_json", "mistral"}


# -- reasoning -----------------------------------------------------------------------------------------------
def _rstream(parser: ReasoningParser, pieces):
    r = c = ""
    for p in pieces:
        a, b = parser.feed(p)
        r, c = r + a, c + b
    a, b = parser.finish()
    return (r + a) or None, (c + b) or None


R_CASES = [  # (starts in reasoning, output, reasoning, content)
    (True, "I should add 2 and 2.</think>\n\nThe answer is 4.", "I should add 2 and 2.", "\n\nThe answer is 4."),
    (True, "<think>\nplan</think>answer", "\nplan", "answer"),
    (True, "still thinking when cut <", "still thinking when cut <", None),
    (True, "</think>just content", None, "just content"),
    (False, "<think>r1 </thin k> r2</think> c </think>", "r1 </thin k> r2", " c </think>"),
    (False, "  <think>x</think>y", "x", "y"),
    (False, "no think block <think>late</think>", None, "no think block <think>late</think>"),
    (False, "<thin", None, "<thin"),
    (False, "", None, None),
]


@pytest.mark.parametrize("inside,text,reasoning,content", R_CASES)
@pytest.mark.parametrize("cls", list(REASONING_PARSERS.values()))
def test_reasoning_split_whole_and_streamed(cls, inside, text, reasoning, content):
    assert ReasoningParser.parse_with(cls(inside), text) == (reasoning, content)
    for pieces in _splits(text) if text else [[""]]:
        assert _rstream(cls(inside), pieces) == (reasoning, content), pieces


def test_reasoning_start_per_parser_and_request():
    ds, qw = DeepSeekR1ReasoningParser, Qwen3ReasoningParser
    out = "thought</think>answer"
    split = lambda p: ReasoningParser.parse_with(p, out)  # noqa: E731
    # DeepSeek-R1: the template opened <think>; unless the prompt closed it or a grammar shapes the output
    assert split(ds.for_request("<|Assistant|><think>\n", {}, False)) == ("thought", "answer")
    assert split(ds.for_request("<|Assistant|>", {}, False)) == ("thought", "answer")
    assert split(ds.for_request("<think>\n\n</think>\n\n", {}, False)) == (None, out)
    assert split(ds.for_request("<|Assistant|>", {}, True)) == (None, out)
    assert split(ds.for_request("<|Assistant|><think>", {}, True)) == ("thought", "answer")  # the prompt opened it
    # Qwen3: inside only when the prompt ends with <think>; enable_thinking=False means content
    assert split(qw.for_request("<|im_start|>assistant\n<think>\n", {}, False)) == ("thought", "answer")
    assert split(qw.for_request("<|im_start|>assistant\n", {}, False)) == (None, out)
    assert split(qw.for_request("<|im_start|>assistant\n<think>", {}, True)) == ("thought", "answer")
    assert split(qw.for_request("<|im_start|>assistant\n<think>\n", {"enable_thinking": False}, False)) == \
        (None, out)
    explicit = "<think>t</think>c"
    assert ReasoningParser.parse_with(qw.for_request("assistant\n", {}, False), explicit) == ("t", "c")


# -- the chat pipeline: reasoning, then tools in the content -------------------------------------------------
def _pipe_stream(make, pieces):
    pipe = make()
    total = MessageDelta()
    for p in pieces:
        total.add(pipe.feed(p))
    total.add(pipe.finish())
    return (total.reasoning or None, total.content or None,
            [(c.name, c.arguments) for c in collect_calls(total.calls)])


def test_reasoning_then_tool_calls_whole_and_streamed():
    text = "<think>The user wants weather.</think>\n" + hermes(CALLS[:2], before="")
    make = lambda: ChoiceOutput(Qwen3ReasoningParser(False), HermesToolParser())  # noqa: E731
    msg, called = make().message(text)
    assert called and msg["reasoning"] == msg["reasoning_content"] == "The user wants weather."
    assert msg["content"] is None  # only whitespace outside the calls
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in msg["tool_calls"]] == CALLS[:2]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in msg["tool_calls"])
    whole = (msg["reasoning"], None, [(c["function"]["name"], c["function"]["arguments"]) for c in msg["tool_calls"]])
    for pieces in _splits(text, three_way=30):
        r, c, calls = _pipe_stream(make, pieces)
        assert (r, (c or "").strip() or None, calls) == whole


def test_named_call_and_invalid_auto_call():
    args = json.dumps(CALLS[0][1])
    msg, called = ChoiceOutput(None, NamedCall("get_weather")).message(args)
    assert called and msg["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": args}
    assert msg["content"] is None
    for pieces in _splits(args, three_way=10):
        assert _pipe_stream(lambda: ChoiceOutput(None, NamedCall("get_weather")), pieces) == \
            (None, None, [("get_weather", args)])
    bad = '<tool_call>{"name": "f", "arguments": {"a": </tool_call>'
    msg, called = ChoiceOutput(None, HermesToolParser()).message(bad)
    assert not called and msg["content"] == bad and "tool_calls" not in msg


def test_single_call():
    text = hermes(CALLS[:3], before="")
    msg, called = ChoiceOutput(None, HermesToolParser(), single_call=True).message(text)
    assert called and [c["function"]["name"] for c in msg["tool_calls"]] == [CALLS[0][0]]
    for pieces in _splits(text, three_way=10):
        calls = _pipe_stream(lambda: ChoiceOutput(None, HermesToolParser(), single_call=True), pieces)[2]
        assert calls == [(c["function"]["name"], c["function"]["arguments"]) for c in msg["tool_calls"]]


def test_stream_delta_shape():
    pipe = ChoiceOutput(None, HermesToolParser())
    first = pipe.delta(pipe.feed('<tool_call>{"name": "f", "arguments": {"a"'))
    later = pipe.delta(pipe.feed(': 1}}</tool_call>'))
    assert first == {"tool_calls": [{"index": 0, "id": pipe.ids[0], "type": "function",
                                     "function": {"name": "f", "arguments": '{"a"'}}]}
    assert later == {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}
    assert pipe.delta(pipe.feed("<tool")) is None  # held back: may be a marker


@pytest.mark.parametrize("engine,mode,called,want", [
    ("stop", "auto", True, "tool_calls"), ("stop", "required", True, "tool_calls"), ("stop", "named", True, "stop"),
    ("length", "auto", True, "length"), ("stop", "auto", False, "stop"), ("stop", "none", False, "stop")])
def test_finish_reason(engine, mode, called, want):
    assert finish_reason(engine, mode, called) == want
