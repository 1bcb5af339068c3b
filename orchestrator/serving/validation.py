"""Turns a GenerateRequest into a Request, or says which field is wrong and with which gRPC status."""
from __future__ import annotations

import math
import time
import uuid

import grpc

from model.sampling import SamplingParams
from model.tokenizer import ChatMessage, Tokenizer
from orchestrator.core.config import Config
from orchestrator.core.request import Request
from orchestrator.core.sla import SLATarget
from protos.disagg.v1 import inference_pb2 as pb

DEFAULT_MAX_TOKENS = 128


class RequestInvalid(Exception):
    """A request the server refuses: `code` is the gRPC status, the message names the field."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


CHAT_ROLES = ("system", "user", "assistant")  # what the chat template renders

def _invalid(message: str) -> RequestInvalid:
    return RequestInvalid(grpc.StatusCode.INVALID_ARGUMENT, message)


class RequestValidator:
    """Checks GenerateRequests against the config, the tokenizer and the model's context window."""

    def __init__(self, cfg: Config, tokenizer: Tokenizer, context_length: int):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.context_length = context_length

    def _prompt_ids(self, msg: pb.GenerateRequest) -> list[int]:
        kind = msg.WhichOneof("prompt")
        if kind is None:
            raise _invalid("prompt: one of text, token_ids or chat is required")
        if kind == "text":
            if not msg.text.strip():
                raise _invalid("prompt.text: must not be empty")
            ids = self.tokenizer.encode(msg.text)
            if not ids:  # only characters the tokenizer drops (control characters)
                raise _invalid("prompt.text: encodes to no tokens")
        elif kind == "token_ids":
            ids = list(msg.token_ids.ids)
            if not ids:
                raise _invalid("prompt.token_ids: must not be empty")
            bad = [i for i in ids if not 0 <= i < self.tokenizer.vocab_size]
            if bad:
                raise _invalid(f"prompt.token_ids: {bad[0]} is outside [0, {self.tokenizer.vocab_size})")
        else:
            if not msg.chat.messages or not any(m.content.strip() for m in msg.chat.messages):
                raise _invalid("prompt.chat: needs at least one non-empty message")
            for i, m in enumerate(msg.chat.messages):
                if m.role not in CHAT_ROLES:
                    raise _invalid(f"prompt.chat.messages[{i}].role: {m.role!r} is not one of {', '.join(CHAT_ROLES)}")
            try:
                ids = self.tokenizer.chat_ids([ChatMessage(m.role, m.content) for m in msg.chat.messages])
            except ValueError as e:
                raise _invalid(f"prompt.chat.{e}") from None
        return ids

    def _sampling(self, msg: pb.GenerateRequest) -> SamplingParams:
        s = msg.sampling
        max_tokens = s.max_tokens if s.HasField("max_tokens") else min(DEFAULT_MAX_TOKENS, self.cfg.max_tokens_limit)
        if max_tokens > self.cfg.max_tokens_limit:
            raise RequestInvalid(grpc.StatusCode.OUT_OF_RANGE,
                                 f"sampling.max_tokens: {max_tokens} exceeds the limit {self.cfg.max_tokens_limit}")
        params = SamplingParams(
            max_tokens=max_tokens, temperature=s.temperature if s.HasField("temperature") else 0.0,
            top_p=s.top_p if s.HasField("top_p") else 1.0, seed=s.seed if s.HasField("seed") else None,
            stop=tuple(s.stop), ignore_eos=s.ignore_eos)
        try:
            params.validate()
        except ValueError as e:
            raise _invalid(f"sampling.{e}") from None
        return params

    def _sla(self, msg: pb.GenerateRequest) -> SLATarget:
        s = msg.sla
        name = s.sla_class or self.cfg.default_sla_class
        if name not in self.cfg.sla_classes:
            raise RequestInvalid(grpc.StatusCode.NOT_FOUND,
                                 f"sla.sla_class: unknown class {name!r}; known: {', '.join(sorted(self.cfg.sla_classes))}")
        base = self.cfg.sla_classes[name]
        targets = {}
        for field in ("ttft_ms", "tpot_ms"):
            value = getattr(s, field) if s.HasField(field) else getattr(base, field)
            if not math.isfinite(value) or value <= 0:
                raise _invalid(f"sla.{field}: must be a positive finite number of milliseconds, got {value}")
            targets[field] = value
        return SLATarget(priority=s.priority, sla_class=name, **targets)

    def build_request(self, msg: pb.GenerateRequest) -> Request:
        """The Request `msg` asks for; raises RequestInvalid naming the first wrong field."""
        if msg.HasField("model") and msg.model not in (self.cfg.model_name, ""):
            raise RequestInvalid(grpc.StatusCode.NOT_FOUND,
                                 f"model: unknown model {msg.model!r}; this server serves {self.cfg.model_name!r}")
        sampling = self._sampling(msg)
        ids = self._prompt_ids(msg)
        if len(ids) >= self.context_length:
            raise RequestInvalid(grpc.StatusCode.OUT_OF_RANGE,
                                 f"prompt: {len(ids)} tokens exceed the context window {self.context_length}")
        if len(ids) + sampling.max_tokens > self.context_length:
            raise RequestInvalid(grpc.StatusCode.OUT_OF_RANGE,
                                 f"sampling.max_tokens: prompt ({len(ids)}) + max_tokens ({sampling.max_tokens}) "
                                 f"exceeds the context window {self.context_length}")
        rid = msg.request_id or uuid.uuid4().hex
        return Request(rid, ids, sampling, self._sla(msg), time.monotonic())
