"""Request bodies of the OpenAI-compatible API (pydantic), and their mapping to ``SamplingParams``: sampling fields
(defaults from the model's ``generation_config.json`` where the request omits them), the output constraint
(``response_format``, vLLM's ``structured_outputs`` or the legacy ``guided_*`` fields: at most one), logit rules
(``logit_bias``, ``allowed_token_ids``, ``bad_words``), ``prompt_logprobs``; tools and chat-template arguments."""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field

from fastinfer.config import GENERATION_DEFAULTS, generation_defaults  # noqa: F401 - re-exported for the server
from fastinfer.sampling_params import MAX_GRAMMAR_CHARS, SamplingParams, StructuredOutputsParams

logger = logging.getLogger("fastinfer.server")

MAX_TOOLS = 128
MAX_TOOLS_CHARS = MAX_GRAMMAR_CHARS  # the tools' JSON, all together (the "required" grammar is built from it)
MAX_TEMPLATE_KWARGS_CHARS = 4096
# chat_template_kwargs may not override what the server passes to apply_chat_template itself
RESERVED_TEMPLATE_KWARGS = frozenset({"conversation", "messages", "tools", "documents", "chat_template",
                                      "add_generation_prompt", "continue_final_message", "tokenize",
                                      "return_dict", "return_tensors", "tokenizer_kwargs"})
_STRUCTURED_KEYS = tuple(f.name for f in dataclasses.fields(StructuredOutputsParams))
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


class RequestError(ValueError):
    """Bad input, with the request parameter it concerns (the 400 body's ``param``)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None


class _Common(BaseModel):
    """Sampling fields shared by both endpoints; unknown fields are ignored, as OpenAI does."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    cache_salt: str | None = None
    # output constraints (at most one)
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # logit rules and extras
    logit_bias: dict[str, Any] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    prompt_logprobs: int | None = None
    return_token_ids: bool = False

    def _constraints(self) -> list[tuple[str, dict[str, Any]]]:
        """(parameter, StructuredOutputsParams fields) of each constraint the request sets."""
        found: list[tuple[str, dict[str, Any]]] = []
        rf = self.response_format
        if rf is not None and rf.type != "text":
            if rf.type == "json_object":
                found.append(("response_format", {"json_object": True}))
            elif rf.type == "json_schema":
                if rf.json_schema is None or rf.json_schema.schema_ is None:
                    raise RequestError("response_format", "response_format of type json_schema needs "
                                       "json_schema.schema")
                found.append(("response_format", {"json": rf.json_schema.schema_}))
            else:
                raise RequestError("response_format", "response_format of type structural_tag is not supported")
        if self.structured_outputs is not None:
            unknown = sorted(set(self.structured_outputs) - set(_STRUCTURED_KEYS))
            if unknown:
                raise RequestError("structured_outputs", f"structured_outputs.{unknown[0]} is not supported "
                                   f"(known: {', '.join(_STRUCTURED_KEYS)})")
            found.append(("structured_outputs", dict(self.structured_outputs)))
        for field, key in _GUIDED.items():
            value = getattr(self, field)
            if value is not None:
                found.append((field, {key: value}))
        return found

    def constraint(self) -> StructuredOutputsParams | None:
        """The request's one output constraint, or None. RequestError for two, or for a malformed one."""
        found = self._constraints()
        if len(found) > 1:
            raise RequestError(found[1][0], "give at most one output constraint; got "
                               + ", ".join(name for name, _ in found))
        if not found:
            return None
        param, kwargs = found[0]
        try:
            return StructuredOutputsParams(**kwargs)
        except (ValueError, TypeError) as e:
            raise RequestError(param, f"{param}: {e}") from None

    def constraint_param(self) -> str | None:
        """The parameter the constraint came from (for the engine's errors about it)."""
        found = self._constraints()
        return found[0][0] if found else None

    def sampling(self, max_tokens: int | None, logprobs: int | None, defaults: dict[str, Any],
                 vocab_size: int, constraint: StructuredOutputsParams | None = None,
                 prompt_logprobs: int | None = None, skip_special_tokens: bool | None = None) -> SamplingParams:
        """SamplingParams for this request; ``defaults`` (by SamplingParams name) fill fields the request omits.
        SamplingParams' own checks (and its token-id check against ``vocab_size``) become a RequestError naming
        the parameter (``logit_bias`` keys arrive as OpenAI's token-id strings; SamplingParams reads them)."""
        def pick(name: str, builtin: Any) -> Any:
            v = getattr(self, name)
            return v if v is not None else defaults.get(name, builtin)

        try:
            sp = self._sampling(pick, max_tokens, logprobs, constraint, prompt_logprobs, skip_special_tokens)
            sp.check_token_ids(vocab_size)
        except RequestError:
            raise
        except ValueError as e:
            param = str(e).split(" ", 1)[0].removeprefix("SamplingParams.").split("[", 1)[0]
            raise RequestError(param, str(e)) from None
        return sp

    def _sampling(self, pick: Any, max_tokens: int | None, logprobs: int | None,
                  constraint: StructuredOutputsParams | None, prompt_logprobs: int | None,
                  skip_special_tokens: bool | None) -> SamplingParams:
        return SamplingParams(
            n=self.n, temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0), top_k=pick("top_k", 0),
            min_p=pick("min_p", 0.0), presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=pick("repetition_penalty", 1.0),
            seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens, max_tokens=max_tokens, logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs if prompt_logprobs is None else prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens if skip_special_tokens is None else skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            structured_outputs=constraint, logit_bias=cast(Any, self.logit_bias),  # str keys: SamplingParams reads
            allowed_token_ids=self.allowed_token_ids, bad_words=self.bad_words)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None  # 16 (OpenAI's default) unless generation_config.json sets max_new_tokens
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None


class FunctionCallIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(p["text"])
        return "".join(parts)

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it; tool-call arguments as dicts (templates ``tojson`` them)."""
        m: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            m["name"] = self.name
        if self.tool_call_id is not None:
            m["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            m["tool_calls"] = [{"id": c.id, "type": "function",
                                "function": {"name": c.function.name, "arguments": _json_or_text(c.function.arguments)}}
                               for c in self.tool_calls]
        return m


def _json_or_text(args: str | dict[str, Any]) -> Any:
    if isinstance(args, dict):
        return args
    try:
        return json.loads(args)
    except ValueError:
        return args


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"] = "function"
    function: NamedFunction


class _ChatTemplateArgs(BaseModel):
    """What the chat template is rendered with."""

    model_config = ConfigDict(extra="ignore")

    tools: list[ChatTool] | None = Field(default=None, max_length=MAX_TOOLS)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    def template_args(self) -> dict[str, Any]:
        """Keyword arguments for ``apply_chat_template`` (RequestError naming the bad parameter)."""
        if self.continue_final_message and self.add_generation_prompt:
            raise RequestError("continue_final_message", "continue_final_message and add_generation_prompt cannot "
                               "both be true (set add_generation_prompt to false)")
        kw: dict[str, Any] = {"add_generation_prompt": self.add_generation_prompt,
                              "continue_final_message": self.continue_final_message}
        if self.tools:
            tools = [t.model_dump(exclude_none=True) for t in self.tools]
            if len(json.dumps(tools)) > MAX_TOOLS_CHARS:
                raise RequestError("tools", f"tools are more than {MAX_TOOLS_CHARS} characters of JSON")
            kw["tools"] = tools
        extra = self.chat_template_kwargs or {}
        try:
            size = len(json.dumps(extra))
        except (TypeError, ValueError):
            raise RequestError("chat_template_kwargs", "chat_template_kwargs must be JSON") from None
        if size > MAX_TEMPLATE_KWARGS_CHARS:
            raise RequestError("chat_template_kwargs", f"chat_template_kwargs is {size} characters of JSON; at "
                               f"most {MAX_TEMPLATE_KWARGS_CHARS}")
        reserved = sorted(RESERVED_TEMPLATE_KWARGS & set(extra))
        if reserved:
            raise RequestError("chat_template_kwargs", f"chat_template_kwargs may not set {reserved[0]!r}")
        return {**extra, **kw}


class ChatCompletionRequest(_ChatTemplateArgs, _Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def tool_mode(self) -> tuple[str, str | None]:
        """("none" | "auto" | "required" | "named", the named function): OpenAI's default is "auto" with tools,
        "none" without. RequestError for a choice that names no given tool, or "required" without tools."""
        choice = self.tool_choice
        names = [t.function.name for t in self.tools or []]
        if choice is None:
            return ("auto" if names else "none"), None
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in names:
                raise RequestError("tool_choice", f"tool_choice names the function {choice.function.name!r}, which "
                                   f"is not among the given tools ({', '.join(names) or 'none given'})")
            return "named", choice.function.name
        if choice in ("required", "auto") and not names:
            raise RequestError("tool_choice", f'tool_choice "{choice}" needs tools')
        return choice, None

    def tool_parameters(self, name: str) -> dict[str, Any]:
        fn = next(t.function for t in self.tools or [] if t.function.name == name)
        return fn.parameters or {"type": "object", "properties": {}}


class TokenizeRequest(_ChatTemplateArgs):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]


