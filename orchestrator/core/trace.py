"""Request traces: the Azure LLM inference CSVs (arrival time, prompt and output lengths)."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Sequence

import numpy as np


class TraceError(ValueError):
    """The trace file is missing or malformed; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    arrival_s: float  # seconds since the first request
    prompt_tokens: int
    output_tokens: int


def _timestamp(text: str) -> float:
    # Azure writes 7 fractional digits; datetime takes at most 6
    date, _, frac = text.strip().partition(".")
    return datetime.fromisoformat(date).timestamp() + (float("0." + frac) if frac else 0.0)


def load_azure_trace(path: str | Path, limit: int | None = None) -> list[TraceRequest]:
    """Read TIMESTAMP, ContextTokens, GeneratedTokens rows, sorted by arrival."""
    path = Path(path)
    try:
        f = open(path, newline="")
    except OSError as e:
        raise TraceError(f"{path}: cannot open trace ({e.strerror})") from None
    out: list[TraceRequest] = []
    with f:
        reader = csv.DictReader(f)
        need = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}
        if reader.fieldnames is None or not need <= set(reader.fieldnames):
            raise TraceError(f"{path}: not an Azure LLM trace (need columns {', '.join(sorted(need))})")
        t0 = None
        for lineno, row in enumerate(reader, start=2):
            try:
                t = _timestamp(row["TIMESTAMP"])
                prompt, output = int(row["ContextTokens"]), int(row["GeneratedTokens"])
            except (ValueError, TypeError) as e:
                raise TraceError(f"{path}:{lineno}: malformed row ({e})") from None
            if prompt < 0 or output < 0:
                raise TraceError(f"{path}:{lineno}: negative token count")
            t0 = t if t0 is None else t0
            out.append(TraceRequest(t - t0, prompt, output))
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise TraceError(f"{path}: trace holds no requests")
    out.sort(key=lambda r: r.arrival_s)
    return out


def mean_rate(arrivals_s: Sequence[float]) -> float | None:
    """Requests/s of sorted arrival times: (n - 1) / span; None with fewer than two or a zero span."""
    span = arrivals_s[-1] - arrivals_s[0] if len(arrivals_s) else 0.0
    return (len(arrivals_s) - 1) / span if span > 0 else None


def check_rate(rate: float) -> None:
    """ValueError naming `rate` unless it is a positive number of requests/s."""
    if not rate > 0:
        raise ValueError(f"rate: must be > 0 requests/s, got {rate}")


def time_scale(arrivals_s: Sequence[float], rate: float) -> float:
    """The factor arrival times are multiplied by so that their mean rate becomes `rate` requests/s
    (1.0 when the mean rate is undefined). The one rescaling rule of the live bench and the simulator."""
    check_rate(rate)
    native = mean_rate(arrivals_s)
    return 1.0 if native is None else native / rate


@dataclass(frozen=True, slots=True)
class Scaling:
    """How a trace was fitted to a smaller model and machine (printed with every bench)."""

    length_scale: float  # prompt lengths multiplied by this, then clipped
    output_scale: float
    time_scale: float  # arrival times multiplied by this
    source_rate: float  # requests/s in the trace window used
    target_rate: float

    def describe(self) -> str:
        return (f"prompt lengths x{self.length_scale:.3f}, output lengths x{self.output_scale:.3f}, "
                f"arrivals x{self.time_scale:.3f} ({self.source_rate:.2f} -> {self.target_rate:.2f} req/s)")


def fit_trace(reqs: list[TraceRequest], max_prompt: int, max_output: int,
              target_rate: float) -> tuple[list[TraceRequest], Scaling]:
    """Scale lengths so the 99th-percentile prompt/output fits the limits (longer ones are clipped)
    and arrival times so the trace runs at `target_rate` requests/s."""
    if target_rate <= 0:
        raise ValueError(f"target_rate: must be > 0, got {target_rate}")
    prompts = np.array([r.prompt_tokens for r in reqs], dtype=np.float64)
    outputs = np.array([r.output_tokens for r in reqs], dtype=np.float64)
    ls = min(1.0, max_prompt / max(np.percentile(prompts, 99), 1))
    os_ = min(1.0, max_output / max(np.percentile(outputs, 99), 1))
    arrivals = [r.arrival_s for r in reqs]
    source_rate = mean_rate(arrivals) or target_rate
    ts = time_scale(arrivals, target_rate)
    fitted = [TraceRequest((r.arrival_s - reqs[0].arrival_s) * ts,
                           int(np.clip(round(r.prompt_tokens * ls), 1, max_prompt)),
                           int(np.clip(round(r.output_tokens * os_), 1, max_output))) for r in reqs]
    return fitted, Scaling(ls, os_, ts, source_rate, target_rate)
