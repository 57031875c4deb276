"""Structured outputs and the request extras through a real server on SmolLM2 with the official OpenAI client:
``chat.completions.parse`` with pydantic models, json_object, regex / choice / grammar via ``extra_body`` (and the
legacy ``guided_*``) on both endpoints, every output validated; bad constraints are 400s naming the problem;
logit_bias, allowed_token_ids, bad_words, return_token_ids, continue_final_message, generation_config defaults."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from typing import Annotated

import httpx
import jsonschema
import pytest
from pydantic import BaseModel, Field

from tests.entrypoints.conftest import API_KEY, openai_client

H = {"Authorization": f"Bearer {API_KEY}"}
M = "smollm2"
Short = Annotated[str, Field(max_length=16)]  # bounded strings: a small model may otherwise never close one


class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Address(BaseModel):
    city: Short
    zip: int = Field(ge=10000, le=99999)


class Person(BaseModel):
    name: Short
    age: int = Field(ge=0, le=120)
    height_m: float = Field(ge=0.5, le=2.5)
    favorite: Color
    address: Address
    tags: list[Short] = Field(max_length=3)


class Inventory(BaseModel):
    items: list[Address] = Field(min_length=1, max_length=3)
    total: float = Field(ge=0, le=1000)


class Verdict(BaseModel):
    label: Color
    confident: bool
    score: float = Field(ge=-1, le=1)


@pytest.fixture(scope="module")
def url(smollm2_server):
    return smollm2_server()


@pytest.fixture(scope="module")
def client(url):
    return openai_client(url)


def _user(text):
    return [{"role": "user", "content": text}]


def _parallel(*calls):
    with ThreadPoolExecutor(len(calls)) as ex:
        return [f.result() for f in [ex.submit(c) for c in calls]]


def test_parse_pydantic_models(client):
    models = (Person, Inventory, Verdict)
    results = _parallel(*[lambda m=m: client.chat.completions.parse(
        model=M, messages=_user(f"Give me a {m.__name__} as JSON."), response_format=m, max_tokens=300,
        temperature=0) for m in models])
    for m, r in zip(models, results):
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, m)
        jsonschema.validate(json.loads(choice.message.content), m.model_json_schema())


def test_json_object_regex_choice_grammar_on_both_endpoints(client):
    grammar = 'root ::= "(" num " + " num ") = " num\nnum ::= [1-9] [0-9]?'
    reqs = {
        "json_object": lambda: client.chat.completions.create(
            model=M, messages=_user("Give a JSON object with the key answer and the value 4."),
            response_format={"type": "json_object"}, max_tokens=120, temperature=0).choices[0],
        "regex": lambda: client.chat.completions.create(
            model=M, messages=_user("A phone number?"), max_tokens=30, temperature=0,
            extra_body={"structured_outputs": {"regex": r"\+1-[0-9]{3}-[0-9]{4}"}}).choices[0],
        "choice": lambda: client.chat.completions.create(
            model=M, messages=_user("Is the sky green?"), max_tokens=10, temperature=0,
            extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe not"]}}).choices[0],
        "grammar": lambda: client.chat.completions.create(
            model=M, messages=_user("Add two numbers."), max_tokens=30, temperature=0.8, seed=1,
            extra_body={"structured_outputs": {"grammar": grammar}}).choices[0],
        "guided_regex": lambda: client.completions.create(
            model=M, prompt="The date today is", max_tokens=20, temperature=0,
            extra_body={"guided_regex": r" [0-9]{4}-[0-9]{2}-[0-9]{2}"}).choices[0],
        "guided_choice": lambda: client.completions.create(
            model=M, prompt="Paris is in", max_tokens=10, temperature=0.7, n=3, seed=0,
            extra_body={"guided_choice": [" France", " Spain"]}).choices,
        "cmpl_schema": lambda: client.completions.create(
            model=M, prompt="A JSON verdict:", max_tokens=120, temperature=0,
            extra_body={"response_format": {"type": "json_schema", "json_schema": {
                "name": "v", "schema": Verdict.model_json_schema()}}}).choices[0],
    }
    got = dict(zip(reqs, _parallel(*reqs.values())))
    obj = got["json_object"]
    assert obj.finish_reason == "stop" and isinstance(json.loads(obj.message.content), dict)
    assert re.fullmatch(r"\+1-[0-9]{3}-[0-9]{4}", got["regex"].message.content)
    assert got["choice"].message.content in ("yes", "no", "maybe not")
    assert re.fullmatch(r"\([1-9][0-9]? \+ [1-9][0-9]?\) = [1-9][0-9]?", got["grammar"].message.content)
    assert re.fullmatch(r" [0-9]{4}-[0-9]{2}-[0-9]{2}", got["guided_regex"].text)
    assert {c.text for c in got["guided_choice"]} <= {" France", " Spain"} and len(got["guided_choice"]) == 3
    assert got["cmpl_schema"].finish_reason == "stop"
    Verdict.model_validate_json(got["cmpl_schema"].text)
    for c in got.values():
        for one in c if isinstance(c, list) else [c]:
            assert one.finish_reason == "stop"


def test_streamed_constrained_output_equals_whole(client):
    kw = dict(model=M, messages=_user("Give me a Verdict as JSON."), max_tokens=120, temperature=0,
              response_format={"type": "json_schema", "json_schema": {"name": "v",
                                                                      "schema": Verdict.model_json_schema()}})
    whole, chunks = _parallel(lambda: client.chat.completions.create(**kw),
                              lambda: list(client.chat.completions.create(**kw, stream=True)))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and chunks[-1].choices[0].finish_reason == "stop"
    Verdict.model_validate_json(text)


BAD = [
    ("schema type", "/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nonsense"}}}}, "response_format"),
    ("regex", "/v1/chat/completions", {"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
    ("grammar", "/v1/completions", {"structured_outputs": {"grammar": "root ::= undefined_rule"}},
     "structured_outputs"),
    ("guided regex", "/v1/completions", {"guided_regex": "[z-a]"}, "guided_regex"),
    ("two constraints", "/v1/chat/completions", {"response_format": {"type": "json_object"},
                                                 "guided_choice": ["a"]}, "guided_choice"),
    ("unknown key", "/v1/completions", {"structured_outputs": {"jsonn": {}}}, "structured_outputs"),
    ("no schema", "/v1/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format"),
    ("empty choice", "/v1/chat/completions", {"guided_choice": []}, "guided_choice"),
    ("logit_bias key", "/v1/completions", {"logit_bias": {"abc": 1}}, "logit_bias"),
    ("logit_bias vocab", "/v1/chat/completions", {"logit_bias": {"999999": 1}}, "logit_bias"),
    ("logit_bias value", "/v1/completions", {"logit_bias": {"5": 200}}, "logit_bias"),
    ("allowed ids", "/v1/completions", {"allowed_token_ids": [10**7]}, "allowed_token_ids"),
    ("both flags", "/v1/chat/completions", {"continue_final_message": True}, "continue_final_message"),
    ("template kwargs", "/v1/chat/completions", {"chat_template_kwargs": {"tokenize": True}},
     "chat_template_kwargs"),
    ("prompt_logprobs stream", "/v1/completions", {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("name,path,extra,param", BAD, ids=[b[0] for b in BAD])
def test_bad_constraints_and_extras_are_400s(url, name, path, extra, param, stream):
    body = {"model": M, "max_tokens": 4, "stream": stream, **extra}
    body.update({"messages": _user("hi")} if "chat" in path else {"prompt": "hi"})
    r = httpx.post(url + path, json=body, headers=H, timeout=60)
    assert r.status_code == 400, r.text  # streamed too: the engine's verdict comes before the stream starts
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"] and err["param"] == param


def test_still_serving_after_bad_input(client):
    ok = client.completions.create(model=M, prompt="still alive", max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason == "length"


def _tokenize(url, **body):
    return httpx.post(url + "/tokenize", json=body, headers=H).json()["tokens"]


def test_logit_rules(url, client):
    tid = _tokenize(url, prompt=" banana", add_special_tokens=False)[-1]
    allowed = _tokenize(url, prompt=" one two three", add_special_tokens=False)
    forced, restricted, free, banned = _parallel(
        lambda: client.completions.create(model=M, prompt="I like", max_tokens=4, temperature=0,
                                          logit_bias={str(tid): 100}, extra_body={"return_token_ids": True}),
        lambda: client.completions.create(model=M, prompt="Count:", max_tokens=6, temperature=1.0, seed=0,
                                          extra_body={"allowed_token_ids": allowed, "return_token_ids": True}),
        lambda: client.completions.create(model=M, prompt="The capital of France is", max_tokens=4,
                                          temperature=0),
        lambda: client.completions.create(model=M, prompt="The capital of France is", max_tokens=4,
                                          temperature=0, extra_body={"bad_words": ["Paris"]}))
    assert forced.choices[0].model_extra["token_ids"] == [tid] * 4
    assert set(restricted.choices[0].model_extra["token_ids"]) <= set(allowed)
    assert "Paris" in free.choices[0].text and "Paris" not in banned.choices[0].text


def test_return_token_ids_and_continue_final_message(url, client):
    msgs = _user("Name a fruit.")
    r = client.chat.completions.create(model=M, messages=msgs, max_tokens=6, temperature=0,
                                       extra_body={"return_token_ids": True})
    assert r.model_extra["prompt_token_ids"] == _tokenize(url, messages=msgs)
    ids = r.choices[0].model_extra["token_ids"]
    assert len(ids) == r.usage.completion_tokens
    text = httpx.post(url + "/detokenize", json={"tokens": ids}, headers=H).json()["prompt"]
    assert text.startswith(r.choices[0].message.content)  # the stop token's text (if any) is not content
    prefix = msgs + [{"role": "assistant", "content": "My favourite fruit is the"}]
    flags = {"continue_final_message": True, "add_generation_prompt": False}
    rendered = httpx.post(url + "/detokenize", json={"tokens": _tokenize(url, messages=prefix, **flags)},
                          headers=H).json()["prompt"]
    assert rendered.endswith("<|im_start|>assistant\nMy favourite fruit is the")
    cont = client.chat.completions.create(model=M, messages=prefix, max_tokens=4, temperature=0, extra_body=flags)
    want = client.completions.create(model=M, prompt=_tokenize(url, messages=prefix, **flags), max_tokens=4,
                                     temperature=0)
    assert cont.choices[0].message.content == want.choices[0].text


def test_stop_token_text_is_not_content(url, client):
    """With special tokens kept, the end-of-turn token that stopped the output is still not part of it."""
    kept, skipped = _parallel(*[lambda s=s: client.chat.completions.create(
        model=M, messages=_user("Say hello."), max_tokens=40, temperature=0,
        extra_body={"skip_special_tokens": s, "return_token_ids": True}) for s in (False, True)])
    assert kept.choices[0].finish_reason == "stop"
    eos = httpx.post(url + "/detokenize", json={"tokens": kept.choices[0].model_extra["token_ids"][-1:]},
                     headers=H).json()["prompt"]
    assert eos == "<|im_end|>" and eos not in kept.choices[0].message.content
    assert kept.choices[0].message.content == skipped.choices[0].message.content


def test_generation_config_defaults(smollm2_server, tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "max_new_tokens": 5}))
    url = smollm2_server(generation_config=str(tmp_path))
    c = openai_client(url)
    implicit = c.chat.completions.create(model=M, messages=_user("Tell me a story."))
    explicit = c.chat.completions.create(model=M, messages=_user("Tell me a story."), temperature=0, max_tokens=5)
    assert implicit.usage.completion_tokens == 5 and implicit.choices[0].finish_reason == "length"
    assert implicit.choices[0].message.content == explicit.choices[0].message.content
    longer = c.chat.completions.create(model=M, messages=_user("Tell me a story."), max_tokens=7)
    assert longer.usage.completion_tokens == 7  # the request's own value wins
