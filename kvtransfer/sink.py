"""Where a receiver puts KV bytes: the decode worker's paged KV pool implements this."""
from __future__ import annotations

from typing import Protocol

import numpy as np

from kvtransfer.layout import KVLayout


class KVRefused(Exception):
    """The sink cannot take a transfer. `code` is a gRPC status name for the wire."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code  # "INVALID_ARGUMENT" (layout mismatch), "RESOURCE_EXHAUSTED" (no blocks), ...


class KVSink(Protocol):
    def open(self, request_id: str, layout: KVLayout, n_tokens: int) -> None:
        """Reserve room for n_tokens of every layer, or raise KVRefused. Nothing is held on refusal."""

    def write(self, request_id: str, layer: int, token_start: int, k: np.ndarray, v: np.ndarray) -> None:
        """Store k, v: (n, n_kv_heads, head_dim) for tokens [token_start, token_start + n) of `layer`."""

    def commit(self, request_id: str) -> None:
        """Every layer of every token has arrived; the sequence may now be scheduled."""

    def abort(self, request_id: str) -> None:
        """Release everything held for request_id (idempotent)."""
