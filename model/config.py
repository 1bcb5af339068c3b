"""Architecture of a Llama-family model as read from GGUF metadata."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shape of a Llama-architecture transformer; every figure comes from the model file."""

    name: str
    n_layers: int
    d_model: int
    d_ff: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_base: float
    rms_eps: float
    vocab_size: int
    context_length: int
    bos_token_id: int
    eos_token_id: int
    tied_embeddings: bool

    def __post_init__(self) -> None:
        assert self.n_heads % self.n_kv_heads == 0, "query heads must be a multiple of KV heads"
        assert self.head_dim % 2 == 0, "RoPE needs an even head dimension"

    @property
    def group_size(self) -> int:
        """Query heads sharing one KV head (grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def kv_bytes_per_token(self, itemsize: int = 4) -> int:
        """K and V over all layers for one token."""
        return 2 * self.n_layers * self.kv_dim * itemsize
