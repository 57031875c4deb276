"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over one shared, continuously batching engine.

Routes: /v1/completions, /v1/chat/completions (SSE streaming), /v1/models, /tokenize, /detokenize,
/metrics (Prometheus), /health. Errors use OpenAI's body: ``{"error": {"message", "type", "param", "code"}}``.
With an API key every route but /health needs ``Authorization: Bearer KEY`` (constant-time compare,
decided on the path alone). Request bodies, n, max_tokens, prompt length and requests in flight are bounded.

Beyond sampling: output constraints (``response_format``, ``structured_outputs``, ``guided_*``), tools rendered
by the chat template with ``tool_choice`` auto (parsed by a ``tool_parsers`` parser) / required / named (forced by
a JSON-schema grammar), reasoning split by a ``reasoning_parsers`` parser (``chat_output``), ``echo`` and
``logprobs`` over the prompt, ``prompt_logprobs``, logit rules, ``return_token_ids``, ``continue_final_message``,
``chat_template_kwargs``, and request defaults from the model's ``generation_config.json``.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fastinfer.engine.async_engine import AsyncLLMEngine, EngineDeadError, QueueFullError
from fastinfer.engine.llm_engine import LLMEngine
from fastinfer.entrypoints.chat_output import ChoiceOutput, NamedCall, finish_reason
from fastinfer.entrypoints.metrics import ServerMetrics
from fastinfer.entrypoints.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    RequestError,
    TokenizeRequest,
    generation_defaults,
)
from fastinfer.entrypoints.reasoning_parsers import REASONING_PARSERS, ReasoningParser
from fastinfer.entrypoints.tool_parsers import (
    TOOL_PARSERS,
    JsonArrayCalls,
    ToolParser,
    detect_tool_parser,
    required_tools_schema,
)
from fastinfer.outputs import CompletionOutput, Logprob, RequestOutput
from fastinfer.sampling_params import SamplingParams, StructuredOutputsParams

logger = logging.getLogger("fastinfer.server")
ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


@dataclass(frozen=True)
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_n: int = 16
    max_prompts: int = 64
    max_pending: int = 256
    shutdown_timeout: float = 30.0
    disconnect_poll_s: float = 0.2
    chat_template: str | None = None  # instead of the tokenizer's
    tool_call_parser: str | None = None  # None: the one the chat template's markers name, if any
    reasoning_parser: str | None = None
    # vLLM's structured_outputs_config.enable_in_reasoning: False (the default) applies an output constraint only
    # after the reasoning block when the output starts inside one; True applies it from the first token
    enable_in_reasoning: bool = False
    generation_config: str = "auto"  # "auto" (the model directory's generation_config.json), "vllm" or a folder


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code



def _engine_healthy(engine: Any) -> bool:
    """False once the engine's executor has failed (a tensor-parallel rank died or hung)."""
    try:
        engine.check_health()
    except Exception:
        return False
    return True

def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


# -- ASGI middlewares: run before routing and body parsing --------------------------------------------------
def _send_error(status: int, message: str, type_: str, code: str):
    body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()

    async def send_it(send):
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return send_it


class GuardMiddleware:
    """Auth (every path except /health when a key is set) and the request-body size limit."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.key = f"Bearer {api_key}".encode() if api_key else None
        self.max_body = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.key is not None and scope["path"] != "/health":
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.key):
                return await _send_error(401, "missing or invalid API key", "authentication_error",
                                         "invalid_api_key")(send)
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await _send_error(413, f"request body larger than {self.max_body} bytes",
                                     "invalid_request_error", "body_too_large")(send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_body:
                    raise APIError(413, f"request body larger than {self.max_body} bytes", code="body_too_large")
            return msg

        try:
            await self.app(scope, limited_receive, send)
        except APIError as e:  # raised while the body streamed in, before any response started
            await _send_error(e.status, e.message, e.type, e.code or "")(send)


# -- the app ---------------------------------------------------------------------------------------------
def build_app(engine: LLMEngine, cfg: ServerConfig, async_engine: AsyncLLMEngine | None = None) -> FastAPI:
    """The FastAPI app. Its lifespan starts a stepping thread (or uses ``async_engine``, whose loop its owner
    runs) and stops it, draining, at shutdown."""
    state: dict[str, Any] = {}
    metrics = ServerMetrics(lambda: state.get("async"), cfg.served_model_name, engine.max_model_len)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state["async"] = async_engine or AsyncLLMEngine(engine, cfg.max_pending)
        yield
        aeng: AsyncLLMEngine = state["async"]
        aeng.accepting = False
        deadline = time.monotonic() + cfg.shutdown_timeout
        while aeng.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        aeng.stop()

    app = FastAPI(title="fastinfer", lifespan=lifespan)
    tok = engine.tokenizer
    max_len = engine.max_model_len
    vocab = engine.model_config.vocab_size
    defaults = generation_defaults(engine.config.model, cfg.generation_config)
    tool_cls, reasoning_cls = _parsers(cfg, tok)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, e: RequestError):
        return error_response(400, str(e), param=e.param)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        msg = "invalid JSON body" if first.get("type") == "json_invalid" else f"{loc}: {first.get('msg')}"
        return error_response(400, msg, param=loc, code="invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)

    def check_model(name: str | None) -> None:
        if name is not None and name != cfg.served_model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {cfg.served_model_name!r}",
                           param="model", code="model_not_found")

    def sampling(req: Any, prompt_len: int, max_tokens: int | None, fallback: int | None, logprobs: int | None,
                 **kw: Any) -> SamplingParams:
        """SamplingParams for one prompt. ``max_tokens`` as given (checked against the context), else the model's
        default, else ``fallback``, else the rest of the context (defaults are capped at the context)."""
        if not isinstance(req.n, int) or not 1 <= req.n <= cfg.max_n:
            raise APIError(400, f"n must be between 1 and {cfg.max_n}", param="n")
        if prompt_len >= max_len:
            raise APIError(400, f"prompt has {prompt_len} tokens; this model's context is {max_len} tokens",
                           param="prompt", code="context_length_exceeded")
        room = max_len - prompt_len
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"max_tokens={max_tokens} plus the prompt's {prompt_len} tokens exceeds the "
                           f"context of {max_len} tokens", param="max_tokens", code="context_length_exceeded")
        if max_tokens is None:
            default = defaults.get("max_tokens", fallback)
            max_tokens = room if default is None else min(default, room)
        return req.sampling(max_tokens, logprobs, defaults, vocab, **kw)  # a RequestError names the parameter

    def aengine() -> AsyncLLMEngine:
        return state["async"]

    async def collect(rid: str, prompt: dict, sp: SamplingParams, request: Request) -> RequestOutput:
        """Run one request to the end; abort it if the client disconnects first."""
        async def run() -> RequestOutput:
            final = None
            async for out in aengine().generate(rid, prompt, sp):
                final = out
            assert final is not None
            return final

        task = asyncio.ensure_future(run())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=cfg.disconnect_poll_s)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    task.cancel()
                    raise APIError(499, "client disconnected")
        finally:
            if not task.done():
                task.cancel()

    async def run_all(jobs: list[tuple[str, dict, SamplingParams]], request: Request,
                      param: str | None) -> list[RequestOutput]:
        try:
            finals = await asyncio.gather(*[collect(rid, p, sp, request) for rid, p, sp in jobs])
        except APIError:
            raise
        except Exception as e:
            raise submit_errors(e, param) from None
        for out in finals:
            _raise_if_error(out)
            metrics.observe(out)
        return finals

    async def start_streams(jobs: list[tuple[str, dict, SamplingParams]], request: Request,
                            param: str | None) -> list[_Started]:
        """Queue the requests and wait for each one's first output, so input the engine rejects (an invalid
        schema, say) is a 400 rather than an error event inside a 200 stream."""
        streams: list[_Started] = []
        try:
            for rid, p, sp in jobs:
                try:
                    streams.append(_Started(aengine().add_request(rid, p, sp), aengine(), rid))
                except Exception as e:
                    raise submit_errors(e, param) from None
            for s in streams:
                task = asyncio.ensure_future(s.queue.get())
                while not (await asyncio.wait({task}, timeout=cfg.disconnect_poll_s))[0]:
                    if await request.is_disconnected():
                        task.cancel()
                        raise APIError(499, "client disconnected")
                first = task.result()
                if isinstance(first, BaseException):
                    raise submit_errors(first, param)
                s.pending.append(first)
        except BaseException:
            for s in streams:
                s.aeng.abort(s.rid)
            raise
        return streams

    def submit_errors(e: BaseException, constraint_param: str | None = None) -> APIError:
        """The HTTP error for a request the engine did not take; its complaints about the output constraint
        name the request parameter that set it."""
        if isinstance(e, QueueFullError):
            return APIError(429, str(e), "rate_limit_error", code="queue_full")
        if isinstance(e, EngineDeadError):
            return APIError(503, str(e), "server_error", code="shutting_down")
        if isinstance(e, ValueError):
            msg = str(e)
            if constraint_param is not None and "structured_outputs" in msg:
                return APIError(400, msg if constraint_param == "structured_outputs" else f"{constraint_param}: "
                                f"{msg}", param=constraint_param)
            if msg.startswith("SamplingParams."):
                return APIError(400, msg, param=msg.split(" ", 1)[0].removeprefix("SamplingParams."))
            return APIError(400, msg)
        return APIError(500, f"internal error: {e}", "server_error")

    def decode_one(tid: int) -> str:
        return tok.decode([tid], skip_special_tokens=False)

    def render(messages: list, args: dict[str, Any]) -> str:
        try:
            conv = [m.for_template() for m in messages]
            return tok.apply_chat_template(conv, tokenize=False, chat_template=cfg.chat_template, **args)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        except Exception as e:  # template errors (e.g. a role the template rejects)
            raise APIError(400, f"chat template failed: {e}", param="messages") from None

    # -- routes ----------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        a = state.get("async")
        ok = a is not None and a.alive and a.accepting and _engine_healthy(a.engine)
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.served_model_name, "object": "model", "created": 0,
                                            "owned_by": "fastinfer", "max_model_len": max_len}]}

    @app.get("/metrics")
    async def prom():
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if req.messages is not None:
            text = render(req.messages, req.template_args())
            ids = tok.encode(text, add_special_tokens=False)
        else:
            ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": max_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        check_model(req.model)
        if any(not 0 <= t < vocab for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": tok.decode(req.tokens)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if req.stream and req.prompt_logprobs is not None:
            raise APIError(400, "prompt_logprobs is not available when streaming", param="prompt_logprobs")
        prompts = _prompt_list(req.prompt)
        if not prompts or len(prompts) > cfg.max_prompts:
            raise APIError(400, f"give between 1 and {cfg.max_prompts} prompts", param="prompt")
        encoded: list[dict[str, Any]] = []
        for p in prompts:
            ids = tok.encode(p) if isinstance(p, str) else p
            if not ids:
                raise APIError(400, "prompt is empty", param="prompt")
            if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
                raise APIError(400, "prompt token ids out of range", param="prompt")
            encoded.append({"prompt_token_ids": ids, "cache_salt": req.cache_salt,
                            **({"prompt": p} if isinstance(p, str) else {})})
        echo_only = req.echo and req.max_tokens == 0  # the prompt back (scored): one token is run, then dropped
        plp = req.prompt_logprobs
        if req.echo and req.logprobs is not None:
            plp = max(plp or 0, req.logprobs)
        constraint = req.constraint()
        sps = [sampling(req, len(e["prompt_token_ids"]), 1 if echo_only else req.max_tokens, 16, req.logprobs,
                        constraint=constraint, prompt_logprobs=plp) for e in encoded]
        rid = f"cmpl-{uuid.uuid4().hex}"
        base = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": cfg.served_model_name}
        n = sps[0].n
        jobs = [(f"{rid}-{i}", e, sp) for i, (e, sp) in enumerate(zip(encoded, sps))]
        k = req.logprobs

        def prompt_text(out: RequestOutput) -> str:
            return out.prompt if out.prompt is not None else tok.decode(out.prompt_token_ids)

        def echo_logprobs(out: RequestOutput) -> list[tuple[int, dict | None]]:
            if out.prompt_logprobs is None:
                raise APIError(500, "the engine returned no prompt logprobs", "server_error")
            return list(zip(out.prompt_token_ids, out.prompt_logprobs))

        def shown(c: CompletionOutput, sp: SamplingParams, start: int) -> tuple[str, list[int], list]:
            """Text, token ids and logprob entries of the completion from token ``start`` (none: echo only)."""
            if echo_only:
                return "", [], []
            return c.text, c.token_ids[start:], list(zip(c.token_ids[start:],
                                                                        (c.logprobs or [])[start:]))

        if req.stream:
            streams = await start_streams(jobs, request, req.constraint_param())
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            sent_chars: dict[tuple[int, int], int] = {}

            def chunk(pi: int, c: CompletionOutput, delta: str, lp_from: int, out: RequestOutput) -> dict | None:
                key = (pi, c.index)
                first = key not in sent_chars
                _, ids, entries = shown(c, sps[pi], lp_from)
                text = "" if echo_only else delta
                if first and req.echo:
                    text = prompt_text(out) + text
                    entries = (echo_logprobs(out) if k is not None else []) + entries
                choice: dict[str, Any] = {"index": pi * n + c.index, "text": text, "logprobs": None,
                                          "finish_reason": "length" if echo_only else c.finish_reason}
                if k is not None:
                    choice["logprobs"] = _legacy_logprobs(entries, k, sent_chars.get(key, 0), decode_one)
                if req.return_token_ids:
                    choice["token_ids"] = ids
                    if first:
                        choice["prompt_token_ids"] = out.prompt_token_ids
                sent_chars[key] = sent_chars.get(key, 0) + len(text)
                return {**base, "choices": [choice]}

            return StreamingResponse(_sse(streams, chunk, base, include_usage, metrics,
                                          lambda c, i: c.text,
                                          (lambda outs: _usage(outs, 0)) if echo_only else _usage),
                                     media_type="text/event-stream")
        finals = await run_all(jobs, request, req.constraint_param())
        choices = []
        for pi, out in enumerate(finals):
            for c in out.outputs:
                text, ids, entries = shown(c, sps[pi], 0)
                lead = prompt_text(out) if req.echo else ""
                choice: dict[str, Any] = {"index": pi * n + c.index, "text": lead + text, "logprobs": None,
                                          "finish_reason": "length" if echo_only else c.finish_reason}
                if k is not None:
                    entries = (echo_logprobs(out) if req.echo else []) + entries
                    choice["logprobs"] = _legacy_logprobs(entries, k, 0, decode_one)
                if req.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = _vllm_prompt_logprobs(out, req.prompt_logprobs)
                if req.return_token_ids:
                    choice["prompt_token_ids"], choice["token_ids"] = out.prompt_token_ids, ids
                choices.append(choice)
        return {**base, "choices": choices, "usage": _usage(finals, 0 if echo_only else None)}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        if req.stream and req.prompt_logprobs is not None:
            raise APIError(400, "prompt_logprobs is not available when streaming", param="prompt_logprobs")
        targs = req.template_args()
        mode, named = req.tool_mode()
        constraint, cparam = req.constraint(), req.constraint_param()
        if mode in ("required", "named"):
            if constraint is not None:
                raise RequestError("tool_choice", f'tool_choice "{mode}" forces the output, so it cannot be '
                                   "combined with response_format / structured_outputs / guided_*")
            single = req.parallel_tool_calls is False
            schema = required_tools_schema(targs["tools"], single) if named is None else req.tool_parameters(named)
            try:
                constraint, cparam = StructuredOutputsParams(json=schema), "tools"
            except ValueError as e:
                raise RequestError("tools", str(e)) from None
        if mode == "auto" and tool_cls is None:
            raise RequestError("tool_choice", 'tool_choice "auto" needs a tool-call parser: start the server with '
                               f"--tool-call-parser ({', '.join(TOOL_PARSERS)}); or use \"required\", a named "
                               'function or "none"')
        text = render(req.messages, targs)
        ids = tok.encode(text, add_special_tokens=False)
        template_kwargs = req.chat_template_kwargs or {}
        # output that starts inside a reasoning block: the constraint applies after its end tag (as vLLM)
        after_reasoning = (reasoning_cls is not None and constraint is not None and not cfg.enable_in_reasoning
                           and reasoning_cls.for_request(text, template_kwargs, False).inside)
        if after_reasoning:
            assert constraint is not None and reasoning_cls is not None
            constraint = dataclasses.replace(constraint, reasoning_end=reasoning_cls.end)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        keep_special = mode == "auto" and tool_cls is not None and _drops_markers(tok, tool_cls.special_markers)
        sp = sampling(req, len(ids), max_tokens, None, (req.top_logprobs or 0) if req.logprobs else None,
                      constraint=constraint, skip_special_tokens=False if keep_special else None)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        base = {"id": rid, "object": "chat.completion", "created": int(time.time()),
                "model": cfg.served_model_name}
        prompt = {"prompt": text, "prompt_token_ids": ids, "cache_salt": req.cache_salt}
        k = req.top_logprobs or 0

        def choice_output() -> ChoiceOutput:
            shaped = constraint is not None and not after_reasoning  # a grammar from the first token
            reasoning = reasoning_cls.for_request(text, template_kwargs, shaped) if reasoning_cls is not None else None
            tools = (tool_cls() if mode == "auto" and tool_cls is not None else JsonArrayCalls()
                     if mode == "required" else NamedCall(named) if named is not None else None)
            return ChoiceOutput(reasoning, tools, single_call=req.parallel_tool_calls is False)

        if req.stream:
            streams = await start_streams([(rid, prompt, sp)], request, cparam)
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            chunk_base = {**base, "object": "chat.completion.chunk"}
            pipes: dict[int, ChoiceOutput] = {}

            def chunk(_: int, c: CompletionOutput, delta: str, lp_from: int, out: RequestOutput) -> dict | None:
                first = c.index not in pipes
                pipe = pipes.setdefault(c.index, choice_output())
                d = pipe.feed(delta)
                if c.finish_reason is not None:
                    d.add(pipe.finish())
                msg = pipe.delta(d)
                if msg is None and c.finish_reason is None and not first:
                    return None  # all held back (a possible marker): logprobs and ids go with the next chunk
                msg = {"role": "assistant", **(msg or {})} if first else (msg or {})
                choice: dict[str, Any] = {"index": c.index, "delta": msg, "logprobs": _chat_logprobs(c, k, lp_from)
                                          if req.logprobs else None,
                                          "finish_reason": finish_reason(c.finish_reason, mode, bool(pipe.ids))}
                if req.return_token_ids:
                    choice["token_ids"] = c.token_ids[lp_from:]
                ev = {**chunk_base, "choices": [choice]}
                if req.return_token_ids and first:
                    ev["prompt_token_ids"] = out.prompt_token_ids
                return ev

            return StreamingResponse(_sse(streams, chunk, chunk_base, include_usage, metrics,
                                          lambda c, _: c.text), media_type="text/event-stream")
        out = (await run_all([(rid, prompt, sp)], request, cparam))[0]
        choices = []
        for c in out.outputs:
            msg, called = choice_output().message(c.text)
            choice = {"index": c.index, "message": msg, "logprobs": _chat_logprobs(c, k, 0) if req.logprobs else None,
                      "finish_reason": finish_reason(c.finish_reason, mode, called)}
            if req.return_token_ids:
                choice["token_ids"] = c.token_ids
            choices.append(choice)
        resp = {**base, "choices": choices, "usage": _usage([out])}
        if req.prompt_logprobs is not None:
            resp["prompt_logprobs"] = _vllm_prompt_logprobs(out, req.prompt_logprobs)
        if req.return_token_ids:
            resp["prompt_token_ids"] = out.prompt_token_ids
        return resp

    app.add_middleware(GuardMiddleware, api_key=cfg.api_key, max_body_bytes=cfg.max_body_bytes)
    app.state.fastinfer = state
    app.state.metrics = metrics
    return app


# -- helpers --------------------------------------------------------------------------------------------------
def _parsers(cfg: ServerConfig, tok: Any) -> tuple[type[ToolParser] | None, type[ReasoningParser] | None]:
    """The tool-call parser (``--tool-call-parser``, else the one the chat template's markers name) and the
    reasoning parser (``--reasoning-parser``); logged."""
    template = cfg.chat_template or getattr(tok, "chat_template", None)
    name = cfg.tool_call_parser
    if name is None:
        name = detect_tool_parser(template if isinstance(template, str) else None)
        if name is not None:
            logger.info("tool-call parser %s (detected from the chat template)", name)
    tool_cls = _registered(TOOL_PARSERS, name, "tool-call parser")
    reasoning_cls = _registered(REASONING_PARSERS, cfg.reasoning_parser, "reasoning parser")
    logger.info("tool-call parser: %s; reasoning parser: %s", name or "none (tool_choice auto is refused)",
                cfg.reasoning_parser or "none")
    return tool_cls, reasoning_cls


def _registered(registry: dict[str, Any], name: str | None, what: str) -> Any:
    if name is None:
        return None
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; known: {', '.join(sorted(registry))}")
    return registry[name]


def _drops_markers(tok: Any, markers: tuple[str, ...]) -> bool:
    """Whether decoding with skip_special_tokens drops one of these markers (it is a special token)."""
    for m in markers:
        ids = tok.encode(m, add_special_tokens=False)
        if len(ids) == 1 and tok.decode(ids, skip_special_tokens=True) != m:
            return True
    return False


def _prompt_list(p: Any) -> list[str | list[int]]:
    if isinstance(p, str):
        return [p]
    if p and all(isinstance(t, int) for t in p):
        return [p]
    return list(p)


def _raise_if_error(out: RequestOutput) -> None:
    if out.error:
        raise APIError(500 if out.error.startswith("internal") else 400, out.error,
                       "server_error" if out.error.startswith("internal") else "invalid_request_error")


def _usage(outs: list[RequestOutput], completion: int | None = None) -> dict[str, int]:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    if completion is None:
        completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _lp(x: float) -> float:
    return max(x, -9999.0)  # JSON has no -inf (vLLM's clamp)


def _legacy_logprobs(entries: list[tuple[int, dict[int, Logprob] | None]], k: int, offset: int,
                     decode: Callable[[int], str]) -> dict[str, Any]:
    """OpenAI's legacy ``logprobs`` (completions) for (token id, logprob entry) pairs; an entry of None (the first
    prompt token) has null logprobs. ``top_logprobs`` hold the token and the top ``k``; ``text_offset`` counts
    from ``offset``."""
    toks: list[str] = []
    lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for tid, entry in entries:
        if entry is None:
            text, lp, top = decode(tid), None, None
        else:
            chosen = entry[tid]
            text, lp = chosen.decoded_token or "", _lp(chosen.logprob)
            top = {(v.decoded_token or ""): _lp(v.logprob) for t, v in entry.items()
                   if t == tid or (v.rank or 0) <= k}
        toks.append(text)
        lps.append(lp)
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _vllm_prompt_logprobs(out: RequestOutput, k: int) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's ``prompt_logprobs``: per prompt position None (the first) or token id -> logprob, rank, decoded
    token, for the prompt token and the top ``k``."""
    if out.prompt_logprobs is None:
        raise APIError(500, "the engine returned no prompt logprobs", "server_error")
    result: list[dict[str, dict[str, Any]] | None] = []
    for tid, entry in zip(out.prompt_token_ids, out.prompt_logprobs):
        if entry is None:
            result.append(None)
            continue
        result.append({str(t): {"logprob": _lp(v.logprob), "rank": v.rank, "decoded_token": v.decoded_token}
                       for t, v in entry.items() if t == tid or (v.rank or 0) <= k})
    return result


def _chat_logprobs(c: CompletionOutput, k: int, start: int) -> dict[str, Any]:
    content = []
    for tid, entry in zip(c.token_ids[start:], (c.logprobs or [])[start:]):
        chosen = entry[tid]
        ranked = sorted(entry.values(), key=lambda v: v.rank or 0)[:k]
        item = lambda v: {"token": v.decoded_token or "", "logprob": _lp(v.logprob),  # noqa: E731
                          "bytes": list((v.decoded_token or "").encode())}
        content.append({**item(chosen), "top_logprobs": [item(v) for v in ranked]})
    return {"content": content}


@dataclass
class _Started:
    queue: asyncio.Queue
    aeng: AsyncLLMEngine
    rid: str
    pending: list = field(default_factory=list)  # items taken from the queue before streaming began

    async def get(self) -> Any:
        return self.pending.pop(0) if self.pending else await self.queue.get()

    def ready(self) -> bool:
        return bool(self.pending) or not self.queue.empty()


ChunkFn = Callable[[int, CompletionOutput, str, int, RequestOutput], "dict | None"]


async def _sse(streams: list[_Started], chunk: ChunkFn, base: dict, include_usage: bool, metrics: ServerMetrics,
               text_of: Callable[[CompletionOutput, int], str],
               usage: Callable[[list[RequestOutput]], dict[str, int]] = _usage) -> AsyncIterator[str]:
    """Merge the request streams into SSE events (text deltas); aborts all requests if the client leaves.

    ``chunk(stream, output, new text, first unsent token, request output)`` makes the event, or None when there
    is nothing to send yet (its tokens then go with the next event). Snapshots are cumulative, so when several of
    a single-request stream are already waiting (the client or the event loop fell behind the engine) only the
    newest becomes an event: fewer, larger deltas, no backlog."""
    if len(streams) == 1:  # the common case: read the request's own queue, no merging task
        tasks: list[asyncio.Future] = []
        single = streams[0]
    else:
        merged: asyncio.Queue = asyncio.Queue()
        single = None

        async def pump(i: int, s: _Started) -> None:
            while True:
                item = await s.get()
                await merged.put((i, item))
                if isinstance(item, BaseException) or item.finished:
                    return

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]

    async def next_item() -> tuple[int, Any]:
        if single is None:
            return await merged.get()
        got = await single.get()
        while single.ready() and not isinstance(got, BaseException) and not got.finished:
            got = await single.get()  # a newer cumulative snapshot of the same request supersedes this one
        return 0, got

    sent_text: dict[tuple[int, int], int] = {}
    sent_tokens: dict[tuple[int, int], int] = {}
    finals: list[RequestOutput] = []
    done = 0
    try:
        while done < len(streams):
            i, item = await next_item()
            if isinstance(item, BaseException):
                err = {"error": {"message": str(item), "type": "server_error", "param": None, "code": None}}
                yield f"data: {json.dumps(err)}\n\n"
                done += 1
                continue
            for c in item.outputs:
                key = (i, c.index)
                t0, n0 = sent_text.get(key, 0), sent_tokens.get(key, 0)
                text = text_of(c, i)
                if n0 >= 0 and (len(text) > t0 or c.finish_reason is not None):
                    ev = chunk(i, c, text[t0:], n0, item)
                    sent_text[key] = len(text)
                    if ev is not None:
                        yield f"data: {json.dumps(ev)}\n\n"
                        sent_tokens[key] = len(c.token_ids)
                    if c.finish_reason is not None:
                        sent_tokens[key] = -1  # the finish chunk is sent once
            if item.finished:
                done += 1
                finals.append(item)
                metrics.observe(item)
        if include_usage:
            yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage(finals)})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            if not any(f.request_id == s.rid for f in finals):
                s.aeng.abort(s.rid)
