"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over one shared, continuously batching engine.

Routes: /v1/completions, /v1/chat/completions (SSE streaming), /v1/models, /tokenize, /detokenize,
/metrics (Prometheus), /health. Errors use OpenAI's body: ``{"error": {"message", "type", "param", "code"}}``.
With an API key every route but /health needs ``Authorization: Bearer KEY`` (constant-time compare,
decided on the path alone). Request bodies, n, max_tokens, prompt length and requests in flight are bounded.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fastinfer.engine.async_engine import AsyncLLMEngine, EngineDeadError, QueueFullError
from fastinfer.engine.llm_engine import LLMEngine
from fastinfer.entrypoints.metrics import ServerMetrics
from fastinfer.entrypoints.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from fastinfer.outputs import CompletionOutput, RequestOutput
from fastinfer.sampling_params import SamplingParams

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


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


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
def build_app(engine: LLMEngine, cfg: ServerConfig) -> FastAPI:
    """The FastAPI app; the engine thread starts with the app's lifespan and stops (draining) with it."""
    state: dict[str, Any] = {}
    metrics = ServerMetrics(lambda: state.get("async"), cfg.served_model_name)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state["async"] = AsyncLLMEngine(engine, cfg.max_pending)
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

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code)

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

    def sampling(req: Any, prompt_len: int, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        if not isinstance(req.n, int) or not 1 <= req.n <= cfg.max_n:
            raise APIError(400, f"n must be between 1 and {cfg.max_n}", param="n")
        if prompt_len >= max_len:
            raise APIError(400, f"prompt has {prompt_len} tokens; this model's context is {max_len} tokens",
                           param="prompt", code="context_length_exceeded")
        if max_tokens is not None and prompt_len + max_tokens > max_len:
            raise APIError(400, f"max_tokens={max_tokens} plus the prompt's {prompt_len} tokens exceeds the "
                           f"context of {max_len} tokens", param="max_tokens", code="context_length_exceeded")
        try:
            sp = req.sampling(max_tokens, logprobs)
        except ValueError as e:
            field = str(e).split(" ", 1)[0].removeprefix("SamplingParams.")
            raise APIError(400, str(e), param=field) from None
        if sp.max_tokens is None:
            sp.max_tokens = max_len - prompt_len
        return sp

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

    def submit_errors(e: Exception) -> APIError:
        if isinstance(e, QueueFullError):
            return APIError(429, str(e), "rate_limit_error", code="queue_full")
        if isinstance(e, EngineDeadError):
            return APIError(503, str(e), "server_error", code="shutting_down")
        if isinstance(e, ValueError):
            return APIError(400, str(e))
        return APIError(500, f"internal error: {e}", "server_error")

    # -- routes ----------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        a = state.get("async")
        ok = a is not None and a._thread.is_alive() and a.accepting
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
            text = chat_text(req.messages, True)
            ids = tok.encode(text, add_special_tokens=False)
        else:
            ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": max_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        check_model(req.model)
        vocab = engine.model_config.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": tok.decode(req.tokens)}

    def chat_text(messages: list, add_generation_prompt: bool) -> str:
        try:
            conv = [{"role": m.role, "content": m.text()} for m in messages]
            return tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        except Exception as e:  # template errors (e.g. a role the template rejects)
            raise APIError(400, f"chat template failed: {e}", param="messages") from None

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        if req.echo or req.suffix:
            raise APIError(400, "echo and suffix are not supported", param="echo")
        prompts = _prompt_list(req.prompt)
        if not prompts or len(prompts) > cfg.max_prompts:
            raise APIError(400, f"give between 1 and {cfg.max_prompts} prompts", param="prompt")
        encoded: list[dict[str, Any]] = []
        for p in prompts:
            ids = tok.encode(p) if isinstance(p, str) else p
            if not ids:
                raise APIError(400, "prompt is empty", param="prompt")
            if any(not isinstance(t, int) or not 0 <= t < engine.model_config.vocab_size for t in ids):
                raise APIError(400, "prompt token ids out of range", param="prompt")
            encoded.append({"prompt_token_ids": ids, "cache_salt": req.cache_salt,
                            **({"prompt": p} if isinstance(p, str) else {})})
        sps = [sampling(req, len(e["prompt_token_ids"]), req.max_tokens, req.logprobs) for e in encoded]
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        base = {"id": rid, "object": "text_completion", "created": created, "model": cfg.served_model_name}
        n = sps[0].n
        if req.stream:
            streams = [_start(aengine(), f"{rid}-{i}", e, sp, submit_errors) for i, (e, sp) in
                       enumerate(zip(encoded, sps))]
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            def chunk(pi: int, c: CompletionOutput, delta: str, lp_from: int) -> dict:
                return {**base, "choices": [{"index": pi * n + c.index, "text": delta,
                                             "logprobs": _cmpl_logprobs(c, lp_from) if req.logprobs is not None
                                             else None, "finish_reason": c.finish_reason}]}

            return StreamingResponse(_sse(streams, chunk, base, include_usage, metrics),
                                     media_type="text/event-stream")
        try:
            finals = await asyncio.gather(*[collect(f"{rid}-{i}", e, sp, request)
                                            for i, (e, sp) in enumerate(zip(encoded, sps))])
        except APIError:
            raise
        except Exception as e:
            raise submit_errors(e) from None
        choices = []
        for pi, out in enumerate(finals):
            _raise_if_error(out)
            metrics.observe(out)
            for c in out.outputs:
                choices.append({"index": pi * n + c.index, "text": c.text, "finish_reason": c.finish_reason,
                                "logprobs": _cmpl_logprobs(c, 0) if req.logprobs is not None else None})
        return {**base, "choices": choices, "usage": _usage(finals)}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        text = chat_text(req.messages, req.add_generation_prompt)
        ids = tok.encode(text, add_special_tokens=False)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        sp = sampling(req, len(ids), max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        base = {"id": rid, "object": "chat.completion", "created": int(time.time()),
                "model": cfg.served_model_name}
        prompt = {"prompt": text, "prompt_token_ids": ids, "cache_salt": req.cache_salt}
        k = req.top_logprobs or 0
        if req.stream:
            stream = _start(aengine(), rid, prompt, sp, submit_errors)
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            chunk_base = {**base, "object": "chat.completion.chunk"}
            first = set()

            def chunk(_: int, c: CompletionOutput, delta: str, lp_from: int) -> dict:
                d: dict[str, Any] = {"content": delta}
                if c.index not in first:
                    first.add(c.index)
                    d["role"] = "assistant"
                return {**chunk_base, "choices": [{"index": c.index, "delta": d, "finish_reason": c.finish_reason,
                                                   "logprobs": _chat_logprobs(c, k, lp_from) if req.logprobs
                                                   else None}]}

            return StreamingResponse(_sse([stream], chunk, chunk_base, include_usage, metrics),
                                     media_type="text/event-stream")
        try:
            out = await collect(rid, prompt, sp, request)
        except APIError:
            raise
        except Exception as e:
            raise submit_errors(e) from None
        _raise_if_error(out)
        metrics.observe(out)
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": _chat_logprobs(c, k, 0) if req.logprobs else None,
                    "finish_reason": c.finish_reason} for c in out.outputs]
        return {**base, "choices": choices, "usage": _usage([out])}

    app.add_middleware(GuardMiddleware, api_key=cfg.api_key, max_body_bytes=cfg.max_body_bytes)
    app.state.fastinfer = state
    app.state.metrics = metrics
    return app


# -- helpers --------------------------------------------------------------------------------------------------
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


def _usage(outs: list[RequestOutput]) -> dict[str, int]:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _cmpl_logprobs(c: CompletionOutput, start: int) -> dict[str, Any]:
    toks, lps, tops = [], [], []
    for tid, entry in zip(c.token_ids[start:], (c.logprobs or [])[start:]):
        chosen = entry[tid]
        toks.append(chosen.decoded_token or "")
        lps.append(chosen.logprob)
        tops.append({(v.decoded_token or ""): v.logprob for t, v in entry.items() if t != tid or v.rank == 1})
    return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": []}


def _chat_logprobs(c: CompletionOutput, k: int, start: int) -> dict[str, Any]:
    content = []
    for tid, entry in zip(c.token_ids[start:], (c.logprobs or [])[start:]):
        chosen = entry[tid]
        ranked = sorted(entry.values(), key=lambda v: v.rank or 0)[:k]
        item = lambda v: {"token": v.decoded_token or "", "logprob": v.logprob,  # noqa: E731
                          "bytes": list((v.decoded_token or "").encode())}
        content.append({**item(chosen), "top_logprobs": [item(v) for v in ranked]})
    return {"content": content}


@dataclass
class _Started:
    queue: asyncio.Queue
    aeng: AsyncLLMEngine
    rid: str


def _start(aeng: AsyncLLMEngine, rid: str, prompt: dict, sp: SamplingParams,
           errors: Callable[[Exception], APIError]) -> _Started:
    try:
        return _Started(aeng.add_request(rid, prompt, sp), aeng, rid)
    except Exception as e:
        raise errors(e) from None


async def _sse(streams: list[_Started], chunk: Callable[[int, CompletionOutput, str, int], dict], base: dict,
               include_usage: bool, metrics: ServerMetrics) -> AsyncIterator[str]:
    """Merge the request streams into SSE events (text deltas); aborts all requests if the client leaves.

    Snapshots are cumulative, so when several of a single-request stream are already waiting (the client or the
    event loop fell behind the engine) only the newest becomes an event: fewer, larger deltas, no backlog."""
    if len(streams) == 1:  # the common case: read the request's own queue, no merging task
        merged = streams[0].queue
        tasks: list[asyncio.Future] = []
        single = True
    else:
        merged = asyncio.Queue()
        single = False

        async def pump(i: int, s: _Started) -> None:
            while True:
                item = await s.queue.get()
                await merged.put((i, item))
                if isinstance(item, BaseException) or item.finished:
                    return

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]

    async def next_item() -> tuple[int, Any]:
        got = await merged.get()
        if not single:
            return got
        while not merged.empty() and not isinstance(got, BaseException) and not got.finished:
            got = merged.get_nowait()  # a newer cumulative snapshot of the same request supersedes this one
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
                if len(c.text) > t0 or c.finish_reason is not None and n0 >= 0:
                    yield f"data: {json.dumps(chunk(i, c, c.text[t0:], n0))}\n\n"
                    sent_text[key], sent_tokens[key] = len(c.text), len(c.token_ids)
                    if c.finish_reason is not None:
                        sent_tokens[key] = -1  # the finish chunk is sent once
            if item.finished:
                done += 1
                finals.append(item)
                metrics.observe(item)
        if include_usage:
            yield f"data: {json.dumps({**base, 'choices': [], 'usage': _usage(finals)})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            if not any(f.request_id == s.rid for f in finals):
                s.aeng.abort(s.rid)
