"""WorkerLedger: what the engine placed on its workers counts in the router's views from placement until the
workers report it or it is given up, and the load reports feed the predictor's corrections."""
from __future__ import annotations

import asyncio
import time

import pytest

from decode.worker import DecodeLoad, StepRecord
from orchestrator.core.arrivals import MIN_SPAN_S
from orchestrator.core.correction import Corrections
from orchestrator.core.router import Placement
from orchestrator.core.sla import SLATarget
from orchestrator.serving.ledger import WorkerLedger
from orchestrator.serving.perfmodel import live_deployment
from orchestrator.serving.workers import DecodeHandle, Pools, PrefillHandle
from prefill.worker import PrefillLoad

SLA = SLATarget(2000.0, 200.0)
REMOTE = Placement("p0", "d0", 300.0, 50.0, 400.0, 60.0, 300.0)
LOCAL = Placement("d0", "d0", 100.0, 50.0, 150.0, 60.0, 100.0, local=True)


class _Answers:
    """A worker's calls through its handle: `load` answers with `self.load`."""

    def __init__(self, load):
        self.load = load

    async def __call__(self, method: str):
        assert method == "load"
        return self.load


def _ledger() -> tuple[WorkerLedger, _Answers, _Answers]:
    p0, d0 = _Answers(PrefillLoad("p0", 0, 0)), _Answers(DecodeLoad(0, 0, 100, 100, 16, 0))
    pools = Pools(prefill={"p0": PrefillHandle("p0", p0)}, decode={"d0": DecodeHandle("d0", d0)},
                  kv_targets={"d0": "127.0.0.1:1"})
    ledger = WorkerLedger(pools, Corrections(), live_deployment("smollm2-135m")[0], decode_max_batch=8,
                          prefill_token_budget=512, prefill_max_batch=4, local_chunk_tokens=0)
    asyncio.run(ledger.refresh_all())
    return ledger, p0, d0


def _states(ledger: WorkerLedger):
    (pf,), (dc,) = ledger.views()
    return pf.state, dc.state


def test_a_remote_attempt_counts_in_both_views_until_each_worker_has_it():
    ledger, _, _ = _ledger()
    ledger.count("r~1", REMOTE, 40, 11, SLA, time.monotonic(), mid_stream=False)
    pf, dc = _states(ledger)
    assert [q.n_tokens for q in pf.queue] == [40] and pf.queue[0].ttft_s == pytest.approx(2.0)
    assert dc.batch == 1 and dc.ctx_sum == 40 and dc.tpot_targets == ((0.2, 10),)
    assert ledger.queued_prompts() == 1

    ledger.prefilled("r~1", REMOTE, committed=True)  # its KV is in the decode worker's blocks, not yet submitted
    pf, dc = _states(ledger)
    assert pf.queue == () and dc.batch == 1 and dc.incoming[0][1] == 0  # no KV left to reserve

    ledger.seen("r~1", "d0", 40)  # the decode worker's reports count it from now
    pf, dc = _states(ledger)
    assert dc.batch == 0 and dc.ctx_sum == 0 and dc.tpot_targets == ((0.2, 10),)  # still protected there
    ledger.forget("r~1", REMOTE, prefill_pending=False)
    assert _states(ledger)[1].tpot_targets == ()


def test_what_is_placed_on_a_decode_worker_is_the_rate_its_view_expects_more_at():
    ledger, _, _ = _ledger()
    assert _states(ledger)[1].arriving == (0.0, 0.0)
    ledger.count("r~1", REMOTE, 40, 11, SLA, time.monotonic(), mid_stream=False)
    ledger.count("r~2", LOCAL, 30, 21, SLA, time.monotonic(), mid_stream=False)
    ledger.count("r~3", REMOTE, 30, 1, SLA, time.monotonic(), mid_stream=False)  # one token: never decodes there
    rate, steps = _states(ledger)[1].arriving
    assert rate == pytest.approx(2.0 / MIN_SPAN_S, rel=0.01) and steps == pytest.approx(15.0)


def test_a_migrated_attempt_is_due_within_a_tpot_and_a_local_one_queues_on_the_decode_worker():
    ledger, _, _ = _ledger()
    ledger.count("r~2", REMOTE, 45, 6, SLA, time.monotonic() - 10.0, mid_stream=True)
    assert _states(ledger)[0].queue[0].ttft_s == pytest.approx(0.2)  # the next token is due within a TPOT
    ledger.forget("r~2", REMOTE, prefill_pending=True)
    ledger.seen("r~2", "d0", 45)
    pf, dc = _states(ledger)
    assert pf.queue == () and dc.batch == 0 and dc.tpot_targets == ()

    ledger.count("r~3", LOCAL, 30, 5, SLA, time.monotonic(), mid_stream=False)
    pf, dc = _states(ledger)
    assert pf.queue == () and dc.local_busy_s > 0 and dc.local_tokens == 30
    ledger.local_done("r~3", "d0")
    assert _states(ledger)[1].local_busy_s == 0


def test_load_reports_feed_the_corrections_and_a_failed_call_marks_the_worker_unhealthy():
    ledger, _, d0 = _ledger()
    d0.load = DecodeLoad(1, 0, 99, 100, 16, 20, steps=tuple(
        StepRecord(1, 20, 0.05, 0, 0.5) for _ in range(ledger.corrections.min_samples)))
    asyncio.run(ledger.refresh(ledger.pools.decode["d0"].worker_id, ledger.pools.decode["d0"]))
    assert ledger.corrections.warm("d0", "decode") and list(ledger.cpu_shares["d0"])[-1] == 0.5

    d0.load = RuntimeError("actor died")
    asyncio.run(ledger.refresh("d0", ledger.pools.decode["d0"]))
    assert ledger.unhealthy == {"d0"} and not ledger.views()[1][0].healthy
    assert ledger.decode_loads["d0"].active == 1  # the last load is kept (GetServerInfo)
