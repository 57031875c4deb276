"""Request bodies -> SamplingParams and chat-template arguments: output constraints, logit rules, tool choice,
template kwargs, generation_config.json defaults; every bad input a RequestError naming its parameter."""
from __future__ import annotations

import json
import logging

import jsonschema
import pytest

from fastinfer.entrypoints.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    RequestError,
    generation_defaults,
)
from fastinfer.entrypoints.tool_parsers import required_tools_schema

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
MSGS = [{"role": "user", "content": "hi"}]


def cmpl(**kw):
    return CompletionRequest(prompt="x", **kw)


@pytest.mark.parametrize("body,kind,value", [
    ({"response_format": {"type": "json_object"}}, "json_object", True),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA, "strict": True}}},
     "json", SCHEMA),
    ({"structured_outputs": {"regex": "[a-z]+"}}, "regex", "[a-z]+"),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, "choice", ["yes", "no"]),
    ({"structured_outputs": {"grammar": 'root ::= "a"'}}, "grammar", 'root ::= "a"'),
    ({"guided_json": json.dumps(SCHEMA)}, "json", json.dumps(SCHEMA)),
    ({"guided_regex": "\\d+"}, "regex", "\\d+"),
    ({"guided_choice": ["x"]}, "choice", ["x"]),
    ({"guided_grammar": 'root ::= "b"'}, "grammar", 'root ::= "b"'),
])
def test_constraint_mapping(body, kind, value):
    c = cmpl(**body).constraint()
    assert c.kind == kind and getattr(c, kind) == value
    sp = cmpl(**body).sampling(8, None, {}, 100, constraint=c)
    assert sp.structured_outputs is c
    assert cmpl(response_format={"type": "text"}).constraint() is None and cmpl().constraint() is None


@pytest.mark.parametrize("body,param,words", [
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex", "at most one"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"wat": 1}}, "structured_outputs", "wat"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs", "choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"response_format": {"type": "structural_tag"}}, "response_format", "not supported"),
    ({"guided_json": "x" * 70000}, "guided_json", "characters"),
])
def test_bad_constraints_name_the_param(body, param, words):
    with pytest.raises(RequestError, match=words) as e:
        cmpl(**body).constraint()
    assert e.value.param == param


def test_logit_rules():
    sp = cmpl(logit_bias={"5": 100, "7": -100.0}, allowed_token_ids=[1, 2], bad_words=["bad"]).sampling(
        4, None, {}, 10)
    assert sp.logit_bias == {5: 100.0, 7: -100.0} and sp.allowed_token_ids == [1, 2] and sp.bad_words == ["bad"]
    for bias in ({"x": 1}, {"10": 1}, {"-1": 1}, {"3": 101}, {"3": "1"}, {"3": True}):
        with pytest.raises(RequestError) as e:
            cmpl(logit_bias=bias).sampling(4, None, {}, 10)
        assert e.value.param == "logit_bias"
    for ids in ([], [10], [-1]):
        with pytest.raises(RequestError) as e:
            cmpl(allowed_token_ids=ids).sampling(4, None, {}, 10)
        assert e.value.param == "allowed_token_ids"


def test_generation_defaults_fill_only_omitted_fields(tmp_path, caplog):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_new_tokens": 33, "do_sample": True, "bos_token_id": 1}))
    d = generation_defaults(str(tmp_path), "auto")
    assert d == {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_tokens": 33}
    assert generation_defaults(str(tmp_path), "vllm") == {}
    with caplog.at_level(logging.INFO, logger="fastinfer"):
        assert generation_defaults(str(tmp_path / "model.gguf"), "auto") == {}
    assert "GGUF file" in caplog.text and "built-in sampling defaults" in caplog.text
    sp = cmpl(temperature=0.0).sampling(4, None, d, 100)
    assert (sp.temperature, sp.top_p, sp.top_k, sp.min_p) == (0.0, 0.9, 20, 0.0)
    assert cmpl().sampling(4, None, {}, 100).temperature == 1.0


def chat(**kw):
    return ChatCompletionRequest(messages=MSGS, **kw)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"$ref": "#/$defs/Unit"}},
    "required": ["city", "unit"], "$defs": {"Unit": {"enum": ["c", "f"]}}}}},
    {"type": "function", "function": {"name": "noop"}}]


def test_tool_choice_modes_and_errors():
    assert chat().tool_mode() == ("none", None)
    assert chat(tools=TOOLS).tool_mode() == ("auto", None)
    assert chat(tools=TOOLS, tool_choice="none").tool_mode() == ("none", None)
    assert chat(tools=TOOLS, tool_choice="required").tool_mode() == ("required", None)
    named = {"type": "function", "function": {"name": "noop"}}
    assert chat(tools=TOOLS, tool_choice=named).tool_mode() == ("named", "noop")
    assert chat(tools=TOOLS).tool_parameters("noop") == {"type": "object", "properties": {}}
    for body, words in (({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                         "'nope'"), ({"tool_choice": "required"}, "needs tools")):
        with pytest.raises(RequestError, match=words) as e:
            chat(**body).tool_mode()
        assert e.value.param == "tool_choice"


def test_required_schema_accepts_calls_of_the_given_tools_only():
    schema = required_tools_schema([t for t in TOOLS])
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "c"}},
                         {"name": "noop", "parameters": {}}], schema)
    for bad in ([], [{"name": "other", "parameters": {}}], [{"name": "get_weather", "parameters": {"city": "x"}}],
                [{"name": "get_weather", "parameters": {"city": "x", "unit": "k"}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    single = required_tools_schema(TOOLS, single=True)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "noop", "parameters": {}}] * 2, single)
    clash = [{"function": {"name": "a", "parameters": {"$defs": {"U": {"type": "string"}}}}},
             {"function": {"name": "b", "parameters": {"$defs": {"U": {"type": "integer"}}}}}]
    with pytest.raises(ValueError, match="U"):
        required_tools_schema(clash)


def test_template_args():
    kw = chat(tools=TOOLS, chat_template_kwargs={"enable_thinking": False}).template_args()
    assert kw["enable_thinking"] is False and kw["add_generation_prompt"] is True and len(kw["tools"]) == 2
    assert chat(add_generation_prompt=False, continue_final_message=True).template_args()["continue_final_message"]
    for body in ({"continue_final_message": True}, {"chat_template_kwargs": {"tools": []}},
                 {"chat_template_kwargs": {"x": "y" * 5000}}):
        with pytest.raises(RequestError) as e:
            chat(**body).template_args()
        assert e.value.param in ("continue_final_message", "chat_template_kwargs")
    big = [{"type": "function", "function": {"name": f"f{i}", "parameters": {"description": "d" * 600}}}
           for i in range(120)]
    with pytest.raises(RequestError) as e:
        chat(tools=big).template_args()
    assert e.value.param == "tools"


def test_tool_messages_for_the_template():
    m = ChatCompletionRequest(messages=[
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]).messages
    assert m[0].for_template()["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert m[1].for_template() == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}
