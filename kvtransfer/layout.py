"""The shape contract of a KV cache, checked on both ends of a transfer."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class KVLayout:
    """Per-token K and V of every layer: (n_layers) x (n_kv_heads, head_dim) of `dtype`."""

    n_layers: int
    n_kv_heads: int
    head_dim: int
    dtype: str = "float32"

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    @property
    def bytes_per_token_per_layer(self) -> int:
        """K and V of one token in one layer."""
        return 2 * self.n_kv_heads * self.head_dim * self.itemsize

    def bytes_for(self, n_tokens: int) -> int:
        return self.n_layers * n_tokens * self.bytes_per_token_per_layer

    def mismatch(self, other: "KVLayout") -> str | None:
        """None when equal, else a message naming the first differing field."""
        for field in ("n_layers", "n_kv_heads", "head_dim", "dtype"):
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine != theirs:
                return f"{field}: expected {mine}, got {theirs}"
        return None
