"""Tool calling and reasoning through a real server on SmolLM2 with the official OpenAI client.

SmolLM2's own chat template has no tools, so the server is given a Hermes-style template (``--chat-template``;
ChatML like SmolLM2's, tools listed in ``<tools>``, calls as ``<tool_call>`` JSON, results as
``<tool_response>``); the hermes parser is detected from it. tool_choice required / named are forced by the
server's grammars; auto is shown for each parser (hermes, mistral, llama3_json) on output forced into its format
by a regex (the small model does not call tools by itself) and on free output (no crash, a finish reason
consistent with the message). Reasoning: think tags forced by a regex or opened by ``continue_final_message``."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest

from tests.entrypoints.conftest import API_KEY, openai_client

H = {"Authorization": f"Bearer {API_KEY}"}
M = "smollm2"
TEMPLATE = """{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}You can call these functions, listed in <tools></tools>:
<tools>
{% for t in tools %}{{ t | tojson }}
{% endfor %}</tools>
To call one, reply with <tool_call>
{"name": <function name>, "arguments": <arguments object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% elif m.role == 'assistant' %}<|im_start|>assistant
{{ m.content or '' }}{% for c in m.tool_calls or [] %}<tool_call>
{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif m.role != 'system' %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 20}},
        "required": ["timezone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Time in a timezone",
                                           "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
ARGS_RE = r'\{"city": "[A-Z][a-z]{2,10}", "unit": "(celsius|fahrenheit)"\}'
CALL_RE = r'<tool_call>\n\{"name": "get_weather", "arguments": ' + ARGS_RE + r"\}\n</tool_call>"


@pytest.fixture()
def url(smollm2_server):
    return smollm2_server(chat_template=TEMPLATE)


def _parallel(*calls):
    with ThreadPoolExecutor(len(calls)) as ex:
        return [f.result() for f in [ex.submit(c) for c in calls]]


def _calls(message):
    return [(c.function.name, c.function.arguments) for c in message.tool_calls or []]


def _accumulate(chunks):
    """(reasoning, content, [(name, arguments)], finish reason) from streamed chunks, checking OpenAI's delta
    shape: a call's first delta has its id, type and name, later ones only argument fragments."""
    reasoning = content = ""
    calls: dict[int, list] = {}
    finish = None
    for ch in chunks:
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        reasoning += (d.model_extra or {}).get("reasoning") or ""
        content += d.content or ""
        for tc in d.tool_calls or []:
            if tc.index not in calls:
                assert tc.id and tc.type == "function" and tc.function.name
                calls[tc.index] = [tc.function.name, ""]
            else:
                assert tc.id is None and tc.function.name is None
            calls[tc.index][1] += tc.function.arguments or ""
        finish = ch.choices[0].finish_reason or finish
    return reasoning or None, content or None, [tuple(v) for v in calls.values()], finish


def _valid(calls):
    assert calls
    for name, args in calls:
        jsonschema.validate(json.loads(args), SCHEMAS[name])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}],
                         ids=["required", "named"])
def test_forced_tool_choice_whole_and_streamed(url, choice):
    c = openai_client(url)
    kw = dict(model=M, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=200, temperature=0)
    whole, chunks = _parallel(lambda: c.chat.completions.create(**kw),
                              lambda: list(c.chat.completions.create(**kw, stream=True)))
    msg = whole.choices[0].message
    _valid(_calls(msg))
    assert all(tc.id.startswith("call_") and tc.type == "function" for tc in msg.tool_calls)
    if choice == "required":
        assert whole.choices[0].finish_reason == "tool_calls"
    else:  # a named function: OpenAI's finish reason stays "stop"; the call is that function
        assert whole.choices[0].finish_reason == "stop" and [n for n, _ in _calls(msg)] == ["get_time"]
    _, content, calls, finish = _accumulate(chunks)
    assert (content, calls, finish) == (None, _calls(msg), whole.choices[0].finish_reason)


@pytest.mark.parametrize("parser,regex", [
    ("hermes", CALL_RE), ("mistral", r'\[TOOL_CALLS\] \[\{"name": "get_weather", "arguments": ' + ARGS_RE + r"\}\]"),
    ("llama3_json", r'\{"name": "get_weather", "parameters": ' + ARGS_RE + r"\}")],
    ids=["hermes", "mistral", "llama3_json"])
def test_auto_parses_calls_in_forced_output(smollm2_server, parser, regex):
    c = openai_client(smollm2_server(chat_template=TEMPLATE, tool_call_parser=parser))
    kw = dict(model=M, messages=ASK, tools=TOOLS, max_tokens=60, temperature=0,
              extra_body={"structured_outputs": {"regex": regex}})
    whole, chunks = _parallel(lambda: c.chat.completions.create(**kw),
                              lambda: list(c.chat.completions.create(**kw, stream=True)))
    msg = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls" and msg.content is None
    _valid(_calls(msg))
    assert [n for n, _ in _calls(msg)] == ["get_weather"]
    _, content, calls, finish = _accumulate(chunks)
    assert (content, calls, finish) == (None, _calls(msg), "tool_calls")


def test_auto_on_free_output_and_none(url):
    c = openai_client(url)
    kw = dict(model=M, messages=ASK, tools=TOOLS, max_tokens=40, temperature=0)
    auto, auto_chunks, none = _parallel(
        lambda: c.chat.completions.create(**kw), lambda: list(c.chat.completions.create(**kw, stream=True)),
        lambda: c.chat.completions.create(**kw, tool_choice="none"))
    for r in (auto, none):
        ch = r.choices[0]
        assert ch.finish_reason == ("tool_calls" if ch.message.tool_calls else ch.finish_reason) in \
            ("stop", "length", "tool_calls")
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content
    _, content, calls, finish = _accumulate(auto_chunks)
    assert calls == _calls(auto.choices[0].message) and finish == auto.choices[0].finish_reason
    if not calls:
        assert content == auto.choices[0].message.content


def test_follow_up_turn_renders_the_tool_result(url):
    c = openai_client(url)
    turn = ASK + [{"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_abc", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "22 degrees and sunny"}]
    ids = httpx.post(url + "/tokenize", json={"messages": turn, "tools": TOOLS}, headers=H).json()["tokens"]
    text = httpx.post(url + "/detokenize", json={"tokens": ids}, headers=H).json()["prompt"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' in text
    assert "<tool_response>\n22 degrees and sunny\n</tool_response>" in text
    assert '"name": "get_time"' in text and text.endswith("<|im_start|>assistant\n")
    r = c.chat.completions.create(model=M, messages=turn, tools=TOOLS, tool_choice="none", max_tokens=12,
                                  temperature=0, extra_body={"return_token_ids": True})
    assert r.model_extra["prompt_token_ids"] == ids and r.choices[0].message.content


BAD = [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "launch"}}}, "tool_choice",
     "launch"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "combined"),
    ({"tools": [TOOLS[0]] * 129}, "tools", "129"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name", "pattern"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "string", "description": "d" * 70000}}}}}]}, "tools", "characters"),
]


@pytest.mark.parametrize("extra,param,words", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_tool_input_is_400(url, extra, param, words):
    body = {"model": M, "messages": ASK, "max_tokens": 4, **extra}
    r = httpx.post(url + "/v1/chat/completions", json=body, headers=H, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"]


def test_auto_without_a_parser_is_400(smollm2_server):
    url = smollm2_server()  # SmolLM2's own template: no tool markers, so no parser
    r = httpx.post(url + "/v1/chat/completions", json={"model": M, "messages": ASK, "tools": TOOLS}, headers=H)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    assert "--tool-call-parser" in r.json()["error"]["message"]
    forced = httpx.post(url + "/v1/chat/completions", headers=H, timeout=60, json={
        "model": M, "messages": ASK, "tools": TOOLS, "max_tokens": 80, "temperature": 0,
        "tool_choice": {"type": "function", "function": {"name": "get_time"}}}).json()
    _valid([(c["function"]["name"], c["function"]["arguments"]) for c in forced["choices"][0]["message"]["tool_calls"]])


# -- reasoning -------------------------------------------------------------------------------------------------
def _reasoned(r):
    m = r.choices[0].message
    assert m.model_extra["reasoning"] == m.model_extra["reasoning_content"]
    return m.model_extra["reasoning"], m.content


def test_reasoning_opened_by_the_prompt_qwen3(smollm2_server):
    # the grammar forces the thought too: constraints from the first token (vLLM's enable_in_reasoning)
    c = openai_client(smollm2_server(chat_template=TEMPLATE, reasoning_parser="qwen3", enable_in_reasoning=True))
    msgs = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "<think>\n"}]
    kw = dict(model=M, messages=msgs, max_tokens=60, temperature=0, extra_body={
        "continue_final_message": True, "add_generation_prompt": False,
        "structured_outputs": {"regex": r"[a-z ]{5,30}\n</think>\n\n[A-Z][a-z ]{3,30}\."}})
    whole, chunks = _parallel(lambda: c.chat.completions.create(**kw),
                              lambda: list(c.chat.completions.create(**kw, stream=True)))
    reasoning, content = _reasoned(whole)
    assert reasoning and content and "</think>" not in reasoning + content
    assert reasoning.endswith("\n") and content.startswith("\n\n")
    r, cont, calls, finish = _accumulate(chunks)
    assert (r, cont, calls, finish) == (reasoning, content, [], "stop")
    # enable_thinking=False: the same output is all content
    off = c.chat.completions.create(**{**kw, "extra_body": {**kw["extra_body"],
                                                            "chat_template_kwargs": {"enable_thinking": False}}})
    assert _reasoned(off) == (None, reasoning + "</think>" + content)


def test_reasoning_then_tool_call(smollm2_server):
    c = openai_client(smollm2_server(chat_template=TEMPLATE, reasoning_parser="qwen3", enable_in_reasoning=True))
    kw = dict(model=M, messages=ASK, tools=TOOLS, max_tokens=90, temperature=0,
              extra_body={"structured_outputs": {"regex": r"<think>[a-z ]{5,30}</think>\n" + CALL_RE}})
    whole, chunks = _parallel(lambda: c.chat.completions.create(**kw),
                              lambda: list(c.chat.completions.create(**kw, stream=True)))
    reasoning, content = _reasoned(whole)
    assert reasoning and content is None and whole.choices[0].finish_reason == "tool_calls"
    _valid(_calls(whole.choices[0].message))
    r, cont, calls, finish = _accumulate(chunks)
    assert (r, (cont or "").strip() or None, calls, finish) == \
        (reasoning, None, _calls(whole.choices[0].message), "tool_calls")


def test_constraint_waits_for_the_end_of_reasoning(smollm2_server):
    """Default (vLLM's): output that starts inside a reasoning block is constrained only after its end tag; a
    thought that never closes within max_tokens is the plain, unconstrained continuation."""
    url = smollm2_server(reasoning_parser="deepseek_r1")
    c = openai_client(url)
    forced = c.chat.completions.create(model=M, messages=ASK, max_tokens=8, temperature=0, extra_body={
        "structured_outputs": {"regex": "[0-9]{30}"}})
    prompt = httpx.post(url + "/tokenize", headers=H, json={"messages": ASK}).json()["tokens"]
    plain = c.completions.create(model=M, prompt=prompt, max_tokens=8, temperature=0).choices[0].text
    assert _reasoned(forced) == (plain, None) and not plain.isdigit()


def test_deepseek_r1_reasoning(smollm2_server):
    url = smollm2_server(reasoning_parser="deepseek_r1", enable_in_reasoning=True)
    c = openai_client(url)
    # no think tags forced: the template is taken to have opened <think>, the thought never closes -> reasoning
    free = c.chat.completions.create(model=M, messages=ASK, max_tokens=8, temperature=0)
    reasoning, content = _reasoned(free)
    prompt = httpx.post(url + "/tokenize", headers=H, json={"messages": ASK}).json()["tokens"]
    plain = c.completions.create(model=M, prompt=prompt, max_tokens=8, temperature=0).choices[0].text
    assert (reasoning, content) == (plain, None) and free.choices[0].finish_reason == "length"
    forced = c.chat.completions.create(model=M, messages=ASK, max_tokens=60, temperature=0, extra_body={
        "structured_outputs": {"regex": r"<think>[a-z ]{5,30}</think>[A-Z][a-z ]{3,30}\."}})
    reasoning, content = _reasoned(forced)
    assert reasoning and content and content.endswith(".")
    chunks = list(c.chat.completions.create(model=M, messages=ASK, max_tokens=60, temperature=0, stream=True,
                                            extra_body={"structured_outputs": {
                                                "regex": r"<think>[a-z ]{5,30}</think>[A-Z][a-z ]{3,30}\."}}))
    assert _accumulate(chunks)[:2] == (reasoning, content)
