"""The OpenAI-compatible HTTP door: /v1/models, /v1/completions and /v1/chat/completions (aiohttp, on the
frontend's asyncio loop, like the metrics endpoint).

Bodies are translated into GenerateRequests (orchestrator/serving/openai_request.py) and go through the
same admission as the gRPC API (InferenceService.admitted: validation, draining, the concurrency limit,
metrics), so the rules live once. Refusals are OpenAI error objects with the HTTP status of their gRPC
status; the router's early rejection, which arrives as the first event, is a 429 before any byte of
the answer is sent, streaming or not. A client that goes away cancels its handler, which aborts the
request on both pools. With an API key, every /v1 call needs it as `Authorization: Bearer <key>`.
"""
from __future__ import annotations

import json
import time
import uuid

import grpc
import structlog
from aiohttp import web

from kvtransfer.bearer import refusal
from orchestrator.serving.engine import ErrorEvent, FinalEvent, TokenEvent
from orchestrator.serving.metrics import serve_app
from orchestrator.serving.openai_request import (BodyInvalid, Translated, chat_request, completion_request,
                                                 error_body, http_status, openai_param)
from orchestrator.serving.validation import RequestInvalid

log = structlog.get_logger("openai_http")

OWNER = "pdorchestrator"
MAX_BODY = web.AppKey("max_body_bytes", int)


def _error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None) -> web.Response:
    return web.json_response(error_body(message, kind, param, code), status=status)


def _refusal(code: grpc.StatusCode | str, message: str) -> web.Response:
    status, kind = http_status(code, message)
    param = openai_param(message)
    return _error(status, message, kind, param, "model_not_found" if status == 404 and param == "model" else None)


@web.middleware
async def _errors_as_openai(request: web.Request, handler):
    """aiohttp's own refusals (unknown path, wrong method, oversized body) as OpenAI error objects."""
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        return _error(413, f"body: larger than the limit of {request.app[MAX_BODY]} bytes "
                      "(metadata.frontend.max_message_bytes)", "invalid_request_error", "body")
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _error(e.status, f"{request.method} {request.path}: {e.reason}", "invalid_request_error")


class OpenAIDoor:
    """The handlers; `service` is the frontend's InferenceService (its validator, admission and engine)."""

    def __init__(self, service, api_key: str | None):
        self.service = service
        self.api_key = api_key
        self.created = int(time.time())

    def app(self, max_body_bytes: int) -> web.Application:
        app = web.Application(client_max_size=max_body_bytes, middlewares=[_errors_as_openai])
        app[MAX_BODY] = max_body_bytes
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model}", self.model)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        return app

    def _unauthorized(self, request: web.Request) -> web.Response | None:
        if self.api_key is None:
            return None
        header = request.headers.get("Authorization")
        reason = refusal([] if header is None else [("authorization", header)], self.api_key)
        if reason is None:
            return None
        self.service.metrics.refused(grpc.StatusCode.UNAUTHENTICATED.name)
        return _error(401, f"authorization: {reason.replace('metadata', 'header')}", "authentication_error",
                      code="invalid_api_key")

    def _model_card(self) -> dict:
        return {"id": self.service.cfg.model_name, "object": "model", "created": self.created, "owned_by": OWNER}

    async def models(self, request: web.Request) -> web.Response:
        return self._unauthorized(request) or web.json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        if (refused := self._unauthorized(request)) is not None:
            return refused
        name = request.match_info["model"]
        if name != self.service.cfg.model_name:
            return _refusal(grpc.StatusCode.NOT_FOUND, f"model: unknown model {name!r}; this server serves "
                                                       f"{self.service.cfg.model_name!r}")
        return web.json_response(self._model_card())

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, completion_request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat_request, chat=True)

    async def _body(self, request: web.Request):
        if request.content_type != "application/json":
            raise BodyInvalid("content-type", f"must be application/json, got {request.content_type!r}", 415)
        raw = await request.read()  # HTTPRequestEntityTooLarge past client_max_size
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BodyInvalid("body", f"not valid JSON: {e}") from None

    async def _generate(self, request: web.Request, translate, chat: bool) -> web.StreamResponse:
        if (refused := self._unauthorized(request)) is not None:
            return refused
        try:
            t: Translated = translate(await self._body(request), request.headers)
        except BodyInvalid as e:
            self.service.metrics.refused(grpc.StatusCode.INVALID_ARGUMENT.name)
            return _error(e.status, str(e), "invalid_request_error", e.param)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        t.msg.request_id = rid
        try:
            async with self.service.admitted(t.msg) as (req, events):
                first = await anext(events)
                if isinstance(first, ErrorEvent):  # before any byte of the answer: an HTTP status
                    return _refusal(first.failure.code, first.failure.message)
                answer = _Answer(rid, self.service.cfg.model_name, chat, int(time.time()))
                if t.stream:
                    return await self._stream(request, answer, first, events, t.include_usage)
                return await self._whole(answer, first, events)
        except RequestInvalid as e:
            return _refusal(e.code, str(e))

    async def _whole(self, answer: "_Answer", first, events) -> web.Response:
        text, ev = [], first
        while isinstance(ev, TokenEvent):
            text.append(ev.text)
            ev = await anext(events)
        if isinstance(ev, ErrorEvent):
            return _refusal(ev.failure.code, ev.failure.message)
        return web.json_response(answer.whole("".join(text), ev), headers={"x-request-id": answer.rid})

    async def _stream(self, request: web.Request, answer: "_Answer", first, events, include_usage: bool):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "x-request-id": answer.rid})
        await resp.prepare(request)

        async def send(obj) -> None:
            await resp.write(f"data: {json.dumps(obj)}\n\n".encode())

        if answer.chat:
            await send(answer.chunk({"role": "assistant", "content": ""}, None, include_usage))
        ev = first
        while isinstance(ev, TokenEvent):
            if ev.text:
                await send(answer.chunk(ev.text, None, include_usage))
            ev = await anext(events)
        if isinstance(ev, ErrorEvent):  # after the stream started: an error event, as vLLM sends it
            status, kind = http_status(ev.failure.code, ev.failure.message)
            await send(error_body(ev.failure.message, kind, openai_param(ev.failure.message), str(status)))
        else:
            await send(answer.chunk("" if not answer.chat else {}, ev.finish_reason.value, include_usage))
            if include_usage:
                await send({**answer.head("chunk"), "choices": [], "usage": _usage(ev)})
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def _usage(ev: FinalEvent) -> dict:
    return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
            "total_tokens": ev.prompt_tokens + ev.completion_tokens}


class _Answer:
    """The JSON of one answer, whole or in chunks, for completions or chat."""

    def __init__(self, rid: str, model: str, chat: bool, created: int):
        self.rid, self.model, self.chat, self.created = rid, model, chat, created

    def head(self, kind: str) -> dict:
        obj = ("chat.completion" + (".chunk" if kind == "chunk" else "")) if self.chat else "text_completion"
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model}

    def whole(self, text: str, ev: FinalEvent) -> dict:
        choice = {"index": 0, "finish_reason": ev.finish_reason.value, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
        return {**self.head("whole"), "choices": [choice], "usage": _usage(ev)}

    def chunk(self, delta, finish_reason: str | None, include_usage: bool) -> dict:
        choice = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        if self.chat:
            choice["delta"] = {"content": delta} if isinstance(delta, str) else delta
        else:
            choice["text"] = delta
        out = {**self.head("chunk"), "choices": [choice]}
        if include_usage:
            out["usage"] = None
        return out


async def start_openai_server(service, host: str, port: int, api_key: str | None):
    """Serve the door on host:port (0 picks a free port). Returns (runner, bound port);
    `await runner.cleanup()` stops it. A client that disconnects cancels its handler (and request)."""
    door = OpenAIDoor(service, api_key)
    return await serve_app(door.app(service.cfg.frontend.max_message_bytes), host, port, handler_cancellation=True)
