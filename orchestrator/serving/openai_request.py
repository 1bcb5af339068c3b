"""OpenAI-API request bodies translated into the gRPC API's GenerateRequest, and refusals into OpenAI errors.

Only the shape of the JSON is checked here (types, options the server does not implement, the SLA
headers); every rule about values (ranges, limits, the context window, known models and SLA classes)
stays in orchestrator/serving/validation.py, which sees the translated message like any gRPC one.
Its messages name the gRPC fields; `openai_param` turns such a name into the OpenAI parameter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import grpc

from protos.disagg.v1 import inference_pb2 as pb

TTFT_HEADER, TPOT_HEADER = "x-slo-ttft-ms", "x-slo-tpot-ms"
_INT32, _INT64 = 2**31 - 1, 2**63 - 1
MESSAGE_ROLES = {"developer": "system"}  # newer OpenAI clients send "developer" for the system prompt


class BodyInvalid(ValueError):
    """A request body or header the door refuses: `param` is the OpenAI parameter, `status` the HTTP status."""

    def __init__(self, param: str, message: str, status: int = 400):
        super().__init__(f"{param}: {message}")
        self.param, self.status = param, status


@dataclass(frozen=True, slots=True)
class Translated:
    """What the door needs of a body besides the GenerateRequest."""

    msg: pb.GenerateRequest
    stream: bool
    include_usage: bool  # stream_options.include_usage


# option -> the value that means "not asked for" (anything else is refused, naming the option)
_UNSUPPORTED = {"n": (None, 1), "logprobs": (None, False, 0), "top_logprobs": (None, 0), "tools": (None, []),
                "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
                "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""), "logit_bias": (None, {}),
                "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "audio": (None,),
                "modalities": (None, ["text"]), "prediction": (None,)}


def _check_unsupported(body: dict) -> None:
    for option, allowed in _UNSUPPORTED.items():
        if option not in body:
            continue
        value = body[option]
        if value not in allowed:
            raise BodyInvalid(option, f"{value!r} is not supported by this server (it serves one choice, "
                              "text only, without logprobs, tools or penalties)")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise BodyInvalid("response_format", f"{fmt!r} is not supported; only {{'type': 'text'}}")


def _get(body: dict, key: str, kinds: tuple[type, ...], what: str) -> Any:
    """body[key] if present and not null, checked against `kinds` (bool is never a number)."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise BodyInvalid(key, f"must be {what}, got {type(value).__name__} {value!r}")
    return value


def _int(body: dict, key: str, limit: int) -> int | None:
    value = _get(body, key, (int,), "an integer")
    if value is not None and not -limit - 1 <= value <= limit:
        raise BodyInvalid(key, f"{value} is out of range")
    return value


def _number(body: dict, key: str) -> float | None:
    value = _get(body, key, (int, float), "a number")
    return None if value is None else float(value)


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return list(stop)
    raise BodyInvalid("stop", f"must be a string or a list of strings, got {stop!r}")


def _sla(body: dict, headers) -> pb.SLA:
    sla = pb.SLA()
    name = _get(body, "sla_class", (str,), "a string naming an SLA class")
    if name:
        sla.sla_class = name
    for header, field in ((TTFT_HEADER, "ttft_ms"), (TPOT_HEADER, "tpot_ms")):
        raw = headers.get(header)
        if raw is None:
            continue
        try:
            value = float(raw)
        except ValueError:
            raise BodyInvalid(header, f"must be a number of milliseconds, got {raw!r}") from None
        if not math.isfinite(value) or value <= 0:  # the validator says the same of the gRPC field
            raise BodyInvalid(header, f"must be a positive finite number of milliseconds, got {raw!r}")
        setattr(sla, field, value)
    return sla


def _common(body: Any, headers, max_tokens_keys: tuple[str, ...]) -> tuple[pb.GenerateRequest, bool, bool]:
    if not isinstance(body, dict):
        raise BodyInvalid("body", f"must be a JSON object, got {type(body).__name__}")
    model = _get(body, "model", (str,), "a string")
    if not model:
        raise BodyInvalid("model", "required")
    _check_unsupported(body)
    sampling = pb.SamplingParams(stop=_stop(body))
    given = {k: _int(body, k, _INT32) for k in max_tokens_keys}
    given = {k: v for k, v in given.items() if v is not None}
    if len(set(given.values())) > 1:
        raise BodyInvalid(max_tokens_keys[0], f"contradicts {max_tokens_keys[1]}: {given}")
    if given:
        sampling.max_tokens = next(iter(given.values()))
    for key in ("temperature", "top_p"):
        value = _number(body, key)
        if value is not None:
            setattr(sampling, key, value)
    seed = _int(body, "seed", _INT64)
    if seed is not None:
        sampling.seed = seed
    sampling.ignore_eos = bool(_get(body, "ignore_eos", (bool,), "a boolean"))  # vLLM's extension
    stream = bool(_get(body, "stream", (bool,), "a boolean"))
    options = _get(body, "stream_options", (dict,), "an object")
    if options is not None and not stream:
        raise BodyInvalid("stream_options", "only allowed with stream: true")
    include_usage = bool(_get(options or {}, "include_usage", (bool,), "a boolean"))
    msg = pb.GenerateRequest(model=model, sampling=sampling, sla=_sla(body, headers))
    return msg, stream, include_usage


def completion_request(body: Any, headers) -> Translated:
    """POST /v1/completions: `prompt` is a string, a list of token ids, or a one-element list of either."""
    msg, stream, usage = _common(body, headers, ("max_tokens",))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        msg.text = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(not 0 <= t <= _INT32 for t in prompt):
            raise BodyInvalid("prompt", "token ids must be non-negative 32-bit integers")
        msg.token_ids.ids.extend(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise BodyInvalid("prompt", f"a batch of {len(prompt)} prompts is not supported; send one per request")
    else:
        raise BodyInvalid("prompt", "required: a string or a list of token ids")
    return Translated(msg, stream, usage)


def _content(i: int, content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text ones
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BodyInvalid(f"messages[{i}].content[{j}]", "only {'type': 'text', 'text': ...} parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise BodyInvalid(f"messages[{i}].content", f"must be a string or a list of text parts, got {content!r}")


def chat_request(body: Any, headers) -> Translated:
    """POST /v1/chat/completions: `messages` become the gRPC API's chat prompt (the model's chat template)."""
    msg, stream, usage = _common(body, headers, ("max_completion_tokens", "max_tokens"))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BodyInvalid("messages", "required: a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BodyInvalid(f"messages[{i}]", "must be an object with role and content")
        role = m.get("role")
        if not isinstance(role, str):
            raise BodyInvalid(f"messages[{i}].role", "required: a string")
        msg.chat.messages.add(role=MESSAGE_ROLES.get(role, role), content=_content(i, m.get("content")))
    return Translated(msg, stream, usage)


# gRPC field path (as validation.py names it) -> OpenAI parameter
_PARAMS = (("sampling.", ""), ("prompt.chat.messages", "messages"), ("prompt.chat", "messages"),
           ("prompt.text", "prompt"), ("prompt.token_ids", "prompt"), ("sla.sla_class", "sla_class"),
           ("sla.ttft_ms", TTFT_HEADER), ("sla.tpot_ms", TPOT_HEADER))


def openai_param(message: str) -> str | None:
    """The OpenAI parameter a validator message names ("sampling.top_p: ..." -> "top_p"), None if none."""
    field = message.split(":", 1)[0].strip()
    if not field or " " in field:
        return None
    for prefix, param in _PARAMS:
        if field.startswith(prefix):
            return param + field[len(prefix):] if param else field[len(prefix):]
    return field


# gRPC status -> (HTTP status, OpenAI error type)
_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}


def http_status(code: grpc.StatusCode | str, message: str) -> tuple[int, str]:
    """(HTTP status, OpenAI error type) for a refusal with gRPC status `code` (or its name).
    An unknown SLA class is a bad parameter (400), an unknown model a missing resource (404)."""
    code = grpc.StatusCode[code] if isinstance(code, str) else code
    if code is grpc.StatusCode.NOT_FOUND and openai_param(message) != "model":
        return 400, "invalid_request_error"
    return _STATUS.get(code, (500, "server_error"))


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    """An OpenAI error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
