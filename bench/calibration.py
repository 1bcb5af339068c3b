"""Calibration of the performance model against published figures (issue 5).

Four coefficients are *fitted*, one figure each, so those rows match by construction; they are a
consistency check of the model's form, not a validation. The speculative row is a genuine
prediction from the fitted coefficients plus the `Speculative` defaults.

| coefficient | fitted to |
| --- | --- |
| Trn PerfParams.collective_latency_s | trn2.48xlarge TP64 Llama-3.3-70B ITL 19.8 ms (AWS Neuron docs) |
| Trn PerfParams.prefill_mfu | same setup, 10,000 input tokens, TTFT 0.576 s |
| CS-3 PerfParams.wafer_layer_latency_s | Llama 3.1 8B, 1 system, ~1,800 tok/s/user (Cerebras, Aug 2024) |
| CS-3 PerfParams.wafer_hop_latency_s | Llama 3.1 70B, 4 systems, ~450 tok/s/user (Cerebras, Aug 2024) |
"""
from __future__ import annotations

from dataclasses import dataclass

from hardware.perf import Speculative, decode_step_time, inter_token_latency, make_deployment, prefill_time
from hardware.profiles import get_profile
from model.specs import get_spec


@dataclass(frozen=True, slots=True)
class CalibrationRow:
    setup: str
    metric: str
    published: float
    predicted: float
    fitted: bool  # True: a coefficient was fitted to this figure

    @property
    def error(self) -> float:
        """Relative error of the prediction."""
        return self.predicted / self.published - 1.0


def calibration_table() -> list[CalibrationRow]:
    """Model predictions against the published figures of issue 5."""
    trn = get_profile("trn2.48xlarge")
    cs3 = get_profile("cs3")
    d70 = make_deployment(get_spec("llama-3.3-70b"), trn, tp=64)
    w8 = make_deployment(get_spec("llama-3.1-8b"), cs3, systems=1)
    w70 = make_deployment(get_spec("llama-3.1-70b"), cs3, systems=4)
    ctx = 1000  # context of the Cerebras per-user figures (short chat prompts; barely matters on SRAM)
    spec_itl = inter_token_latency(w70, 1, ctx, Speculative(), draft=w8)
    return [
        CalibrationRow("trn2.48xlarge TP64 llama-3.3-70b bf16, 10k in", "TTFT s", 0.576,
                       prefill_time(d70, [10_000]), True),
        CalibrationRow("trn2.48xlarge TP64 llama-3.3-70b bf16, batch 1", "ITL ms", 19.8,
                       decode_step_time(d70, 1, 10_000) * 1e3, True),
        CalibrationRow("cs3 x1 llama-3.1-8b 16-bit (Aug 2024)", "tok/s/user", 1800,
                       1.0 / decode_step_time(w8, 1, ctx), True),
        CalibrationRow("cs3 x4 llama-3.1-70b 16-bit (Aug 2024)", "tok/s/user", 450,
                       1.0 / decode_step_time(w70, 1, ctx), True),
        CalibrationRow("cs3 x4 llama-3.1-70b speculative (Oct 2024)", "tok/s/user", 2100,
                       1.0 / spec_itl, False),
    ]


def format_table(rows: list[CalibrationRow]) -> str:
    lines = ["| setup | metric | published | predicted | error | fitted |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.setup} | {r.metric} | {r.published:g} | {r.predicted:.4g} | {r.error:+.1%} | "
                     f"{'yes' if r.fitted else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_table(calibration_table()))
