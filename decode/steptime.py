"""Online model of decode step time: ms ~ a + b * batch + c * context tokens (least squares).

Pure: the worker feeds it measured steps; the router reads predictions through DecodeLoad.
Until enough distinct samples exist it falls back to a prior (a fixed cost plus per-sequence cost).
"""
from __future__ import annotations

from collections import deque

import numpy as np


class StepTimeModel:
    """Fits recent (batch, context tokens, ms) samples; predicts ms for a batch."""

    def __init__(self, prior_fixed_ms: float = 20.0, prior_per_seq_ms: float = 2.0, window: int = 256):
        self.prior = (prior_fixed_ms, prior_per_seq_ms, 0.0)
        self._samples: deque[tuple[int, int, float]] = deque(maxlen=window)
        self._coef: tuple[float, float, float] | None = None

    def observe(self, batch: int, context_tokens: int, ms: float) -> None:
        self._samples.append((batch, context_tokens, ms))
        self._coef = None

    def _fit(self) -> tuple[float, float, float]:
        if self._coef is not None:
            return self._coef
        s = np.asarray(self._samples, dtype=np.float64).reshape(-1, 3)  # (n, 3)
        if len(s) < 8 or len(np.unique(s[:, 0])) < 2:
            # too little spread to separate terms: scale the prior to the observed mean
            if len(s):
                a, b, _ = self.prior
                pred = a + b * s[:, 0]
                k = float(np.mean(s[:, 2]) / np.mean(pred))
                self._coef = (a * k, b * k, 0.0)
            else:
                self._coef = self.prior
            return self._coef
        x = np.column_stack([np.ones(len(s)), s[:, 0], s[:, 1]])  # (n, 3)
        ridge = 1e-6 * np.eye(3)
        coef = np.linalg.solve(x.T @ x + ridge, x.T @ s[:, 2])
        self._coef = (max(float(coef[0]), 0.0), max(float(coef[1]), 0.0), max(float(coef[2]), 0.0))
        return self._coef

    def predict(self, batch: int, context_tokens: int) -> float:
        """Milliseconds for one step of `batch` sequences holding `context_tokens` in total."""
        if batch <= 0:
            return 0.0
        a, b, c = self._fit()
        return a + b * batch + c * context_tokens
