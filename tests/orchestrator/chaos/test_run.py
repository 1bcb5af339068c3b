"""The chaos verdict (orchestrator/chaos/run.py report and survived) on hand-built records."""
from __future__ import annotations

from orchestrator.chaos.faults import Fault
from orchestrator.chaos.run import Record, Spec, report, survived


def _rec(rid: str, n: int, tokens: int, chunks=(), **kw) -> Record:
    return Record(Spec(rid, [1, 2, 3], n, 0.0, None), sent=0.0, chunks=list(chunks), tokens=list(range(tokens)), **kw)


def _report(records, faults=(), held=(0, 0, 0), mismatches=()):
    return report(records, list(faults), held, list(mismatches), 0.0, {}, 1.0, 0, 0.0)


def test_a_clean_run_survives_and_times_its_recovery():
    a = _rec("a", 4, 4, [(0.5, 0, 2), (3.0, 2, 2)], final=object())
    b = _rec("b", 4, 0, status="RESOURCE_EXHAUSTED")  # early rejection is not a failure of failover
    kill = Fault("decode_kill", at=1.0, worker="decode-0", fired=True, affected=("a",))
    out = _report([a, b], [kill])
    assert survived(out) and out["recovery_s_max"] == 2.0 and out["faults"] == {"decode_kill": 1}
    assert out["ttft_p99_ms_during_faults"] is None  # a's first token came before the fault


def test_each_broken_invariant_fails_the_run():
    ok = _rec("a", 4, 4, [(0.5, 0, 4)], final=object())
    assert not survived(_report([ok, _rec("b", 4, 2, lost=True)]))
    assert not survived(_report([_rec("c", 4, 3, final=object())]))  # a final one token short
    assert _report([_rec("c", 4, 3, final=object())])["missing_tokens"] == 1
    gap = _report([_rec("d", 4, 2, index_error=(2, 3), status="DATA_LOSS")])
    assert gap["missing_tokens"] == 1 and not survived(gap)
    assert not survived(_report([ok], held=(3, 0, 0)))
    assert not survived(_report([ok], held=(0, 0, 1)))  # the orphan backstop had to release KV
    assert not survived(_report([ok], mismatches=["a"]))
    assert not survived(_report([ok], [Fault("kv_stall", detail="armed, but no transfer met it")]))
    assert not survived(_report([ok, _rec("e", 4, 0, status="UNAVAILABLE")]))
