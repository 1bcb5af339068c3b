"""Token sampling for a batch: greedy, temperature and top-p (nucleus), seeded per request."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request picks tokens. temperature 0 means greedy."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # keep generating past end-of-sequence tokens (benchmarks replaying traces)

    def validate(self, max_tokens_limit: int | None = None) -> None:
        """Raise ValueError naming the offending field."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1, got {self.max_tokens}")
        if max_tokens_limit is not None and self.max_tokens > max_tokens_limit:
            raise ValueError(f"max_tokens: {self.max_tokens} exceeds the limit {max_tokens_limit}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature: must be a finite number >= 0, got {self.temperature}")
        if not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: must lie in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop: stop strings must be non-empty")
        if self.seed is not None and self.seed < 0:  # np.random.default_rng takes none
            raise ValueError(f"seed: must be >= 0, got {self.seed}")

    def stop_token_ids(self, eos_ids: frozenset[int]) -> frozenset[int]:
        """The token ids that end this request: the model's EOS tokens unless ignore_eos."""
        return frozenset() if self.ignore_eos else eos_ids

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_rng(params: SamplingParams, drawn: int = 0) -> np.random.Generator:
    """The request's random stream after `drawn` tokens were sampled from it (sample_one takes one
    draw per sampled token; greedy takes none), so a request continued elsewhere (a migration, the
    decode side after the prefill's first token) samples exactly what one process would have."""
    rng = np.random.default_rng(params.seed)
    if drawn and not params.greedy:
        rng.random(drawn)
    return rng


def sample_one(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """logits: (V,) -> token id."""
    if params.greedy:
        return int(np.argmax(logits))
    z = logits.astype(np.float64)
    with np.errstate(over="ignore"):  # subtract the max first: a tiny temperature gives -inf (p = 0), not inf - inf
        z = (z - z.max()) / params.temperature
    probs = np.exp(z)
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs)
        cum = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cum, params.top_p)) + 1]  # smallest set reaching top_p
        kept = probs[keep] / probs[keep].sum()
        return int(keep[rng.choice(keep.size, p=kept)])
    return int(rng.choice(probs.size, p=probs))


def sample_batch(logits: np.ndarray, params: list[SamplingParams], rngs: list[np.random.Generator]) -> np.ndarray:
    """logits: (B, V) -> token ids (B,). Greedy rows take one vectorised argmax."""
    out = np.argmax(logits, axis=1)  # (B,)
    for i, p in enumerate(params):
        if not p.greedy:
            out[i] = sample_one(logits[i], p, rngs[i])
    return out
