"""A preallocated numpy KV pool with fixed slots: a KVSink for tests, the bench and the in-process backend."""
from __future__ import annotations

import threading

import numpy as np

from kvtransfer.layout import KVLayout
from kvtransfer.sink import KVRefused


class ArraySink:
    """`slots` sequences of up to `max_tokens` tokens; k, v: (slots, n_layers, max_tokens, n_kv_heads, head_dim).

    `events` records (event, request_id) for tests; committed sequences stay until `release`.
    """

    def __init__(self, layout: KVLayout, max_tokens: int, slots: int = 1, *, prefault: bool = True):
        shape = (slots, layout.n_layers, max_tokens, layout.n_kv_heads, layout.head_dim)
        self.layout, self.max_tokens = layout, max_tokens
        self.k = np.empty(shape, dtype=layout.dtype)
        self.v = np.empty(shape, dtype=layout.dtype)
        if prefault:  # touch every page now, not during the first transfer
            self.k.fill(0)
            self.v.fill(0)
        self._free = list(range(slots - 1, -1, -1))
        self._open: dict[str, tuple[int, int]] = {}       # request_id -> (slot, n_tokens)
        self._committed: dict[str, tuple[int, int]] = {}
        self.events: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    @property
    def free_slots(self) -> int:
        with self._lock:
            return len(self._free)

    def open(self, request_id: str, layout: KVLayout, n_tokens: int) -> None:
        diff = self.layout.mismatch(layout)
        if diff:
            raise KVRefused("INVALID_ARGUMENT", f"layout.{diff}")
        if n_tokens > self.max_tokens:
            raise KVRefused("OUT_OF_RANGE", f"n_tokens: {n_tokens} exceeds the pool's {self.max_tokens} per sequence")
        with self._lock:
            if request_id in self._open or request_id in self._committed:
                raise KVRefused("ALREADY_EXISTS", f"request_id: {request_id} already holds a slot")
            if not self._free:
                raise KVRefused("RESOURCE_EXHAUSTED", f"no free KV slot for {n_tokens} tokens")
            self._open[request_id] = (self._free.pop(), n_tokens)
            self.events.append(("open", request_id))

    def write(self, request_id: str, layer: int, token_start: int, k: np.ndarray, v: np.ndarray) -> None:
        slot, n_tokens = self._open[request_id]
        end = token_start + len(k)
        assert 0 <= layer < self.layout.n_layers and 0 <= token_start and end <= n_tokens, (layer, token_start, end)
        self.k[slot, layer, token_start:end] = k  # the one copy: received bytes -> pool
        self.v[slot, layer, token_start:end] = v

    def commit(self, request_id: str) -> None:
        with self._lock:
            self._committed[request_id] = self._open.pop(request_id)
            self.events.append(("commit", request_id))

    def abort(self, request_id: str) -> None:
        with self._lock:
            held = self._open.pop(request_id, None)
            if held is not None:
                self._free.append(held[0])
            self.events.append(("abort", request_id))

    def read(self, request_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Views k, v: (n_layers, n_tokens, n_kv_heads, head_dim) of a committed sequence."""
        slot, n = self._committed[request_id]
        return self.k[slot, :, :n], self.v[slot, :, :n]

    def release(self, request_id: str) -> None:
        """The decode side is done with a committed sequence."""
        with self._lock:
            slot, _ = self._committed.pop(request_id)
            self._free.append(slot)
