"""Writes an experiment's results: results.csv, summary.json, PNG plots, and a terminal table."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

TABLE_COLUMNS = ("mode", "prefill_replicas", "decode_replicas", "rate", "ttft_p50_ms", "ttft_p90_ms",
                 "tpot_p50_ms", "tpot_p90_ms", "sla_attainment", "cost_per_m_tokens")


def table(rows: list[dict]) -> str:
    cols = [c for c in TABLE_COLUMNS if rows and c in rows[0]] + (["goodput_rps"] if rows and "goodput_rps" in rows[0] else [])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    width = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    line = lambda xs: "  ".join(x.rjust(w) for x, w in zip(xs, width))  # noqa: E731
    return "\n".join([line(cols)] + [line(x) for x in cells])


def write(out: Path, name: str, rows: list[dict], cdfs: list[tuple[str, np.ndarray, np.ndarray]], extra: dict) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "results.csv", out / "summary.json"]
    with open(files[0], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    best = max(rows, key=lambda r: (r["sla_attainment"], -r["cost_per_m_tokens"]))
    files[1].write_text(json.dumps({"experiment": name, "points": len(rows), "best": best, **extra},
                                   indent=1, default=float))
    files += _plots(out, rows, cdfs)
    return files


def _label(r: dict) -> str:
    return f"{r['mode']} P{r['prefill_replicas']}:D{r['decode_replicas']} {r['policy']}"


def _plots(out: Path, rows: list[dict], cdfs) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    files = []
    fig, ax = plt.subplots(figsize=(7, 4))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(_label(r), []).append(r)
    for label, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["rate"])
        ax.plot([r["rate"] for r in rs], [r["sla_attainment"] for r in rs], marker="o", label=label)
    ax.set(xlabel="request rate (req/s)", ylabel="SLA attainment", ylim=(0, 1.02))
    ax.axhline(0.9, ls=":", c="grey")
    ax.legend(fontsize=6)
    files.append(out / "sla_vs_rate.png")
    fig.savefig(files[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)
    if "goodput_rps" in rows[0]:
        dis = sorted((r for r in rows if r["mode"] == "disagg"), key=lambda r: r["pd_ratio"])
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
        a1.plot([r["pd_ratio"] for r in dis], [r["goodput_per_unit"] for r in dis], "o-")
        a2.plot([r["pd_ratio"] for r in dis], [r["goodput_per_dollar_hour"] for r in dis], "o-")
        a1.set(xlabel="P:D ratio (replicas)", ylabel="goodput per unit (req/s)")
        a2.set(xlabel="P:D ratio (replicas)", ylabel="goodput per $/h (req/s)")
        files.append(out / "goodput_vs_pd.png")
        fig.savefig(files[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
    for label, ttft, tpot in cdfs[:12]:
        for ax, x in ((a1, ttft), (a2, tpot)):
            if x.size:
                xs = np.sort(x)
                ax.plot(xs, np.arange(1, xs.size + 1) / xs.size, label=label)
    a1.set(xlabel="TTFT (ms)", ylabel="CDF", xscale="log")
    a2.set(xlabel="TPOT (ms)", ylabel="CDF", xscale="log")
    a1.legend(fontsize=6)
    files.append(out / "latency_cdfs.png")
    fig.savefig(files[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)
    return files
