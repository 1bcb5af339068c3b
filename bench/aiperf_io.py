"""What `bench.loadgen` hands NVIDIA's aiperf and reads back: the request file, the command line, the figures.

The request file is aiperf's `single_turn` custom dataset (JSONL, one request a line): `timestamp`
(ms from the start, replayed with `--fixed-schedule`), `output_length` (max_tokens) and, in `extra`
(merged into the request body), the prompt as the exact token ids the project's bench sends over
gRPC plus `ignore_eos`, so both tools send the same requests. `text` holds the same prompt decoded:
aiperf needs a text field, and the token-id `prompt` in `extra` replaces it on the wire.

aiperf's figures (its `profile_export_aiperf.json`), by its own definitions (aiperf 0.13.0,
aiperf/metrics/types/): TTFT = first content chunk - request start; request latency = last content
chunk - request start; inter-token latency = (request latency - TTFT) / (output tokens - 1). With
`--use-server-token-count` the output tokens are the server's `usage.completion_tokens`, not a
re-tokenization of the streamed text. Pure functions of strings and dicts: no aiperf import, no I/O.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

TOOL = "aiperf"  # pinned in the Makefile (bench-loadgen); the version that ran is in its summary
SUMMARY_FILE = "profile_export_aiperf.json"  # aiperf's summary export, in its artifact directory
RECORDS_FILE = "profile_export.jsonl"  # one line per request (with --export-level records)


@dataclass(frozen=True, slots=True)
class LoadRequest:
    """One request of the replay: its arrival (s from the start), prompt token ids and output length."""

    arrival_s: float
    prompt_ids: list[int]
    max_tokens: int


def dataset_lines(requests: list[LoadRequest], decode) -> list[str]:
    """aiperf `single_turn` JSONL lines for `requests`; decode(ids) -> text is the model's tokenizer."""
    return [json.dumps({"text": decode(r.prompt_ids), "timestamp": round(r.arrival_s * 1e3, 3),
                        "output_length": r.max_tokens, "extra": {"prompt": r.prompt_ids, "ignore_eos": True}})
            for r in requests]


def command(executable: Path, *, url: str, model: str, dataset: Path, tokenizer: Path, artifacts: Path,
            request_count: int) -> list[str]:
    """The aiperf command line: streamed /v1/completions, the dataset's own schedule, server token counts."""
    return [str(executable), "profile", "--model", model, "--url", url, "--endpoint-type", "completions",
            "--streaming", "--input-file", str(dataset), "--custom-dataset-type", "single_turn",
            "--fixed-schedule", "--request-count", str(request_count), "--use-server-token-count",
            "--tokenizer", str(tokenizer), "--artifact-dir", str(artifacts), "--export-level", "records",
            "--ui-type", "none", "--no-server-metrics", "--no-gpu-telemetry", "--random-seed", "0"]


@dataclass(frozen=True, slots=True)
class ToolFigures:
    """One tool's figures for the replay, in ms; n = requests that produced each metric."""

    ttft_p50: float
    ttft_p90: float
    tpot_p50: float
    tpot_p90: float
    ttft_n: int
    tpot_n: int
    failed: int

    def as_dict(self) -> dict:
        return {"ttft_ms": {"p50": self.ttft_p50, "p90": self.ttft_p90, "n": self.ttft_n},
                "tpot_ms": {"p50": self.tpot_p50, "p90": self.tpot_p90, "n": self.tpot_n}, "failed": self.failed}


def _metric(summary: dict, tag: str) -> dict:
    """aiperf's summary JSON keeps each metric under its tag, with a `unit` and p50/p90/...; in ms here."""
    m = summary.get(tag)
    if not isinstance(m, dict) or "p50" not in m:
        raise ValueError(f"{SUMMARY_FILE}: no metric {tag!r} with percentiles (keys: {sorted(summary)[:20]})")
    if m.get("unit") != "ms":
        raise ValueError(f"{SUMMARY_FILE}: {tag} is in {m.get('unit')!r}, expected 'ms'")
    return m


def _count(summary: dict, tag: str) -> int:
    m = summary.get(tag)
    return int(m["avg"]) if isinstance(m, dict) and m.get("avg") is not None else 0


def figures(summary: dict) -> ToolFigures:
    """Our figures from aiperf's summary JSON: TTFT and inter-token latency (its TPOT) p50/p90."""
    ttft, itl = _metric(summary, "time_to_first_token"), _metric(summary, "inter_token_latency")
    return ToolFigures(float(ttft["p50"]), float(ttft["p90"]), float(itl["p50"]), float(itl["p90"]),
                       int(ttft.get("count", 0)), int(itl.get("count", 0)), _count(summary, "error_request_count"))



@dataclass(frozen=True, slots=True)
class Record:
    """One request as aiperf recorded it: its line in the request file, when it was sent (ns, aiperf's wall
    clock), its TTFT and inter-token latency (ms; None without one: an error, a single token), its tokens."""

    index: int
    start_ns: int
    ttft_ms: float | None
    itl_ms: float | None
    output_tokens: int | None
    error: bool


def _value(metrics: dict, tag: str, unit: str) -> float | None:
    m = metrics.get(tag)
    if m is None:
        return None
    if m.get("unit") != unit:
        raise ValueError(f"{RECORDS_FILE}: {tag} is in {m.get('unit')!r}, expected {unit!r}")
    return float(m["value"])


def records(lines: list[str]) -> list[Record]:
    """aiperf's records JSONL (one request a line, with --export-level records), its profiling phase only,
    in the order of the request file."""
    out = []
    for line in lines:
        if not line.strip():
            continue
        rec = json.loads(line)
        meta, metrics = rec.get("metadata", {}), rec.get("metrics", {})
        if meta.get("benchmark_phase", "profiling") != "profiling":
            continue
        osl = _value(metrics, "output_sequence_length", "tokens")
        out.append(Record(int(meta["session_num"]), int(meta["request_start_ns"]),
                          _value(metrics, "time_to_first_token", "ms"), _value(metrics, "inter_token_latency", "ms"),
                          None if osl is None else int(osl), bool(rec.get("error"))))
    return sorted(out, key=lambda r: r.index)
