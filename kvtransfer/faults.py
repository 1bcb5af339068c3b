"""Faults a sender can be told to inject into its next transfers: the chaos command's KV faults.

    faults.arm("corrupt")        # the next transfer opened gets it
    kind = faults.take()         # Transfer.__init__: the fault this transfer carries, or None
    faults.fired                 # kind -> transfers it was really applied to (Counter)
    faults.hits                  # (kind, request id, unix time) of each, in order

corrupt: one payload byte of the transfer's first chunk frame is flipped after its checksum was
taken (the receiver refuses the transfer with DATA_LOSS). stall: the sender stops sending after its
first chunk frame, as if the link froze (its stall timeout fails it). truncate: the frame stream
ends after the first chunk frame with no commit (the receiver sees the stream end short). A fault
counts as fired only once applied to a frame, so an armed fault that never met a transfer, or a
transfer that ended before its first chunk, is not counted.
"""
from __future__ import annotations

import threading
import time
from collections import Counter, deque

KINDS = ("corrupt", "stall", "truncate")


class KVFaults:
    """Thread-safe: armed by the worker's loop, taken and fired from transport threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: deque[str] = deque()
        self.fired: Counter[str] = Counter()
        self.hits: list[tuple[str, str, float]] = []

    def arm(self, kind: str, count: int = 1) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind: {kind!r} is not one of {', '.join(KINDS)}")
        if count < 1:
            raise ValueError(f"count: must be >= 1, got {count}")
        with self._lock:
            self._armed.extend([kind] * count)

    def clear(self) -> int:
        """Disarm every fault not yet taken; returns how many there were."""
        with self._lock:
            n, self._armed = len(self._armed), deque()
            return n

    def take(self) -> str | None:
        with self._lock:
            return self._armed.popleft() if self._armed else None

    def fire(self, kind: str, request_id: str) -> None:
        with self._lock:
            self.fired[kind] += 1
            self.hits.append((kind, request_id, time.time()))

    @property
    def armed(self) -> int:
        with self._lock:
            return len(self._armed)


def corrupt(frame: bytes) -> bytes:
    """The frame with its last byte (payload, past the header and checksum) flipped."""
    return frame[:-1] + bytes([frame[-1] ^ 0xFF])
