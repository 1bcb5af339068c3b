"""Per-request token stream on the decode worker: text deltas, stop strings, and the pending chunk."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from model.finish import Failure, FinishReason
from model.generation import TextStream
from model.sampling import SamplingParams
from model.tokenizer import Tokenizer


@dataclass(frozen=True, slots=True)
class TokenChunk:
    """New tokens of one request since the last poll. texts[i] is the text delta of token_ids[i].

    start_index is the index of token_ids[0] among the request's generated tokens; index 0 is the
    first token, sampled on the prefill side and detokenized here like every other.
    Stop tokens are not streamed; no part of a stop string is (model.generation.TextStream).
    """

    request_id: str
    token_ids: tuple[int, ...]
    texts: tuple[str, ...]
    start_index: int
    finished: bool
    finish_reason: FinishReason | None = None  # set on the finished chunk
    error: Failure | None = None  # with FinishReason.ERROR
    stepping_s: float = 0.0  # seconds from the start of the first step it rode here to the end of its last
    # so far: its steps and the local prefills between them (what its TPOT owes the worker's step loop)


@dataclass(slots=True)
class RequestStream:
    """Accumulates one request's output until the client polls it."""

    request_id: str
    params: SamplingParams
    prompt_ids: list[int] | None
    text: TextStream
    stop_token_ids: frozenset[int]
    rng: np.random.Generator
    first_token_id: int = -1  # sampled on the prefill side
    priority: int = 0  # its SLA class's priority (DecodeSeq.priority)
    emitted: int = 0  # tokens handed to the client so far (the earlier attempts' included)
    emitted_before: int = 0  # of those, streamed by an earlier attempt elsewhere (continue_after)
    pending_ids: list[int] = field(default_factory=list)
    pending_texts: list[str] = field(default_factory=list)
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: Failure | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    owner: str = ""  # who polls this stream together with its others (an engine), "" = polled alone
    notify: Callable[[], None] | None = None  # called on every change, after `changed` is set
    first_step_at: float = 0.0  # perf_counter at the start of the first step it rode (0: none yet)
    last_step_end: float = 0.0  # perf_counter at the end of the last one's compute

    @classmethod
    def create(cls, request_id: str, params: SamplingParams, prompt_ids: list[int] | None,
               tokenizer: Tokenizer, rng: np.random.Generator, owner: str = "",
               notify: Callable[[], None] | None = None) -> "RequestStream":
        return cls(request_id, params, prompt_ids, TextStream(tokenizer, params.stop),
                   params.stop_token_ids(tokenizer.stop_token_ids), rng, owner=owner, notify=notify)

    def continue_after(self, generated: list[int]) -> None:
        """The request's first `len(generated)` tokens were streamed by an earlier attempt (a migration):
        indices and text continue after them."""
        self.text.prime(generated)
        self.emitted = self.emitted_before = len(generated)

    def push(self, token_id: int) -> bool:
        """Add a generated token; True when a stop string ended the request here."""
        if self.finished or self.text.stopped or token_id in self.stop_token_ids:
            return False
        for token, delta in self.text.push(token_id):
            self._add(token, delta)
        return self.text.stopped

    def _add(self, token_id: int, text: str) -> None:
        self.pending_ids.append(token_id)
        self.pending_texts.append(text)
        self._changed()

    def finish(self, reason: FinishReason, error: Failure | None = None) -> None:
        assert (reason is FinishReason.ERROR) == (error is not None), "an error ends with FinishReason.ERROR"
        if not self.finished:
            for token, delta in self.text.flush():  # held back for a stop string that never came
                self._add(token, delta)
            self.finished, self.finish_reason, self.error = True, reason, error
        self._changed()

    def stepped(self, start: float, end: float) -> None:
        """It rode a step that started at `start` and computed until `end` (perf_counter)."""
        self.first_step_at = self.first_step_at or start
        self.last_step_end = end

    def _changed(self) -> None:
        self.changed.set()
        if self.notify is not None:
            self.notify()

    def take(self) -> TokenChunk:
        """Hand over everything pending."""
        chunk = TokenChunk(self.request_id, tuple(self.pending_ids), tuple(self.pending_texts), self.emitted,
                           self.finished, self.finish_reason, self.error, self.last_step_end - self.first_step_at)
        self.emitted += len(self.pending_ids)
        self.pending_ids, self.pending_texts = [], []
        self.changed.clear()
        return chunk

    @property
    def stopped(self) -> bool:
        """A stop string ended the text."""
        return self.text.stopped

    @property
    def ready(self) -> bool:
        return bool(self.pending_ids) or self.finished
