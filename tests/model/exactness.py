"""Bookkeeping for exactness comparisons: near-ties met in greedy comparisons and the largest errors.

Filled by the reference tests, printed by tests/model/conftest.py at the end of the run.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TieLog:
    """How often a greedy comparison met a near-tie (reference top-two margin < 1e-4 of logit scale)."""

    compared: dict[str, int] = field(default_factory=dict)
    ties: dict[str, int] = field(default_factory=dict)
    diverged_at_tie: dict[str, int] = field(default_factory=dict)

    def note(self, kind: str, tie: bool, diverged: bool = False) -> None:
        self.compared[kind] = self.compared.get(kind, 0) + 1
        self.ties[kind] = self.ties.get(kind, 0) + int(tie)
        self.diverged_at_tie[kind] = self.diverged_at_tie.get(kind, 0) + int(diverged)

    def lines(self) -> list[str]:
        return [f"{k}: {self.ties[k]} near-ties in {n} greedy comparisons "
                f"({self.diverged_at_tie[k]} argmax divergences, each at a near-tie)"
                for k, n in sorted(self.compared.items())]


TIES = TieLog()
MAX_REL_ERR: dict[str, float] = {}


def record_rel_err(kind: str, value: float) -> None:
    MAX_REL_ERR[kind] = max(MAX_REL_ERR.get(kind, 0.0), float(value))
