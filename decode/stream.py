"""Per-request token stream on the decode worker: text deltas, stop strings, and the pending chunk."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from model.generation import find_stop
from model.sampling import SamplingParams
from model.tokenizer import IncrementalDecoder, Tokenizer


@dataclass(frozen=True, slots=True)
class TokenChunk:
    """New tokens of one request since the last poll. texts[i] is the text delta of token_ids[i].

    start_index is the index of token_ids[0] among the request's generated tokens; index 0 is the
    first token, sampled on the prefill side, so a frontend that already sent it skips index 0.
    Stop tokens are not streamed; a stop string is cut out of the last delta.
    """

    request_id: str
    token_ids: tuple[int, ...]
    texts: tuple[str, ...]
    start_index: int
    finished: bool
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    error: str | None = None  # for "error": "<gRPC code>: message"


@dataclass(slots=True)
class RequestStream:
    """Accumulates one request's output until the client polls it."""

    request_id: str
    params: SamplingParams
    prompt_ids: list[int] | None
    decoder: IncrementalDecoder
    stop_token_ids: frozenset[int]
    rng: np.random.Generator
    first_token_id: int = -1  # sampled on the prefill side
    text: str = ""
    emitted: int = 0  # tokens handed to the client so far
    pending_ids: list[int] = field(default_factory=list)
    pending_texts: list[str] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    owner: str = ""  # who polls this stream together with its others (an engine), "" = polled alone
    notify: Callable[[], None] | None = None  # called on every change, after `changed` is set

    @classmethod
    def create(cls, request_id: str, params: SamplingParams, prompt_ids: list[int] | None,
               tokenizer: Tokenizer, rng: np.random.Generator, owner: str = "",
               notify: Callable[[], None] | None = None) -> "RequestStream":
        return cls(request_id, params, prompt_ids, IncrementalDecoder(tokenizer),
                   params.stop_token_ids(tokenizer.stop_token_ids), rng, owner=owner, notify=notify)

    def push(self, token_id: int) -> bool:
        """Add a generated token; True when a stop string ended the request here."""
        if self.finished or token_id in self.stop_token_ids:
            return False
        delta = self.decoder.push(token_id)
        if self.params.stop:
            cut = find_stop(self.text + delta, self.params.stop)
            if cut >= 0:
                self._add(token_id, (self.text + delta)[len(self.text):cut])
                return True
        self.text += delta
        self._add(token_id, delta)
        return False

    def _add(self, token_id: int, text: str) -> None:
        self.pending_ids.append(token_id)
        self.pending_texts.append(text)
        self._changed()

    def finish(self, reason: str, error: str | None = None) -> None:
        if not self.finished:
            self.finished, self.finish_reason, self.error = True, reason, error
        self._changed()

    def _changed(self) -> None:
        self.changed.set()
        if self.notify is not None:
            self.notify()

    def take(self) -> TokenChunk:
        """Hand over everything pending."""
        chunk = TokenChunk(self.request_id, tuple(self.pending_ids), tuple(self.pending_texts), self.emitted,
                           self.finished, self.finish_reason, self.error)
        self.emitted += len(self.pending_ids)
        self.pending_ids, self.pending_texts = [], []
        self.changed.clear()
        return chunk

    @property
    def ready(self) -> bool:
        return bool(self.pending_ids) or self.finished
