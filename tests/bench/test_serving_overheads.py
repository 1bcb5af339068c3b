"""bench.serving_overheads's estimates from synthetic timings whose overheads are known (no live stack)."""
from __future__ import annotations

import pytest

from hardware.profiles import MeasuredTables
from bench.serving_overheads import overheads

# decode steps 20/40/60 ms at batch 1/4/8 (no context slope); prefill 100 ms at 16 tokens, 1 s at 512
TABLES = MeasuredTables("m", (1, 4, 8), (0.020, 0.040, 0.060), 64, (), (), (16, 512), (0.1, 1.0))
EXTRA, PATH, SLOW_PREFILL, SLOW_DECODE = 0.010, 0.005, 1.3, 1.2


def _idle(prompt: int, tpot: float) -> dict:
    prefill = 0.1 + (prompt - 16) * 0.9 / 496 + EXTRA
    return dict(prompt=prompt, start=0.0, queued_s=0.001, prefill_s=prefill, transfer_s=0.0,
                ttft_s=0.001 + prefill + PATH, tpot_s=tpot)


def _phase(batch: int, step: float) -> tuple[list[dict], list[list]]:
    """Prompts of 16 tokens prefilled in [2 + 2j, 2.5 + 2j) while `batch` streams decode: steps take
    `step` outside those windows and SLOW_DECODE times longer inside."""
    alone = 0.1 + EXTRA
    prompts = [dict(prompt=16, start=2.0 + 2 * j, queued_s=0.0, prefill_s=alone * SLOW_PREFILL - 0.002,
                    transfer_s=0.002) for j in range(3)]
    windows = [(p["start"], p["start"] + p["prefill_s"] + p["transfer_s"]) for p in prompts]
    stream, now = [(0.0, 1)], 0.0
    while now < 9.0:
        now += step * (SLOW_DECODE if any(a <= now < b for a, b in windows) else 1.0)
        stream.append((now, 1))
    return prompts, [stream] * batch


def test_overheads_recover_what_the_timings_were_built_with():
    idle = [_idle(16, 0.020 + 0.002), _idle(512, 0.020 + 0.002)]
    got = overheads(TABLES, idle, {4: _phase(4, 0.043), 8: _phase(8, 0.065)})
    assert got["prefill_extra_s"] == pytest.approx(EXTRA, abs=1e-9)
    assert got["prefill_extra_per_token_s"] == pytest.approx(0.0, abs=1e-9)
    assert got["request_path_s"] == pytest.approx(PATH)
    assert got["token_overhead_batches"] == [1, 4, 8]
    assert got["token_overhead_s"] == pytest.approx([0.002, 0.003, 0.005])
    assert got["corun_slowdown_decode"] == pytest.approx(SLOW_DECODE, rel=1e-6)
    assert got["corun_slowdown_prefill"] == pytest.approx(SLOW_PREFILL, rel=1e-6)
    assert got["corun_gaps_ms"][8]["outside"] == pytest.approx(65.0)
