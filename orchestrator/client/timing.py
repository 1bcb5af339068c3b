"""What a caller sees of one streamed generation: time to first token, time per output token, end to end.

    timing = StreamTiming()                  # the clock starts here, before the request is sent
    await timing.consume(client.generate(...))
    timing.ttft_s, timing.tpot_s, timing.final.timings

Shared by the live bench, the handoff bench and the simulator's fidelity runs, so all three time a
stream the same way. On failure `consume` raises and the fields keep what arrived before it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import AsyncIterable, Callable


@dataclass(slots=True)
class StreamTiming:
    start: float = field(default_factory=time.perf_counter)  # time.perf_counter() seconds
    first: float | None = None  # first chunk that carried tokens
    end: float | None = None  # stream finished
    tokens: int = 0
    final: object | None = None  # the stream's final message (finish reason, usage, server timings)

    async def consume(self, stream: AsyncIterable, on_chunk: Callable[[float, int], None] | None = None) -> "StreamTiming":
        """Drain an AsyncGenerateStream; on_chunk(now, n_tokens) is called for every chunk."""
        async for chunk in stream:
            now = time.perf_counter()
            n = len(chunk.token_ids)
            if self.first is None and n:
                self.first = now
            self.tokens += n
            if on_chunk is not None:
                on_chunk(now, n)
        self.end = time.perf_counter()
        self.final = getattr(stream, "final", None)
        return self

    @property
    def ttft_s(self) -> float | None:
        return None if self.first is None else self.first - self.start

    @property
    def tpot_s(self) -> float | None:
        """Mean gap between output tokens after the first; None with fewer than two tokens."""
        if self.first is None or self.end is None or self.tokens < 2:
            return None
        return (self.end - self.first) / (self.tokens - 1)

    @property
    def e2e_s(self) -> float | None:
        return None if self.end is None else self.end - self.start
