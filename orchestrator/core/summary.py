"""Latency summaries and plain-text tables shared by the live bench and the simulator."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Summary:
    p50: float
    p90: float
    p99: float
    mean: float
    n: int

    @staticmethod
    def of(values) -> "Summary":
        a = np.asarray([v for v in values if v is not None], dtype=np.float64)
        if a.size == 0:
            return Summary(float("nan"), float("nan"), float("nan"), float("nan"), 0)
        p50, p90, p99 = np.percentile(a, [50, 90, 99])
        return Summary(float(p50), float(p90), float(p99), float(a.mean()), int(a.size))

    def as_dict(self) -> dict:
        return {"p50": self.p50, "p90": self.p90, "p99": self.p99, "mean": self.mean, "n": self.n}


def format_table(headers: list[str], rows: list[list], floatfmt: str = "{:.1f}") -> str:
    """Aligned plain-text table; floats formatted with floatfmt."""
    cells = [[floatfmt.format(c) if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join([line, sep, *body])
