"""Simulator: drives the real router/batcher/scheduler/allocator; speed; reports; bad input."""
import dataclasses
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from hardware.perf import chunk_step_time, make_deployment
from hardware.profiles import get_profile
from model.specs import get_spec
from orchestrator.core.experiments import parse_experiments
from orchestrator.core.request import SLATarget
from orchestrator.simulator.engine import PoolSetup, SimConfig, Simulator
from orchestrator.simulator.report import summarize
from orchestrator.simulator.search import goodput
from orchestrator.simulator.units import DecodeUnit
from orchestrator.simulator.workload import from_trace, poisson
from tests.paths import REPO, shared_data

CONV = "azure-llm-2023/AzureLLMInferenceTrace_conv.csv"  # under ../shared/data (tests/paths.py)


def _cfg(**kw):
    m = get_spec("llama-3.1-70b")
    return SimConfig(PoolSetup(make_deployment(m, get_profile("trn2.48xlarge"), tp=64), 1, 8),
                     PoolSetup(make_deployment(m, get_profile("cs3@2024-08")), 1, 64), SLATarget(2000, 50),
                     **{"router_policy": "least_loaded", **kw})


def _reqs(n=300, rate=5.0):
    return poisson(rate, n, [(200, 50), (1500, 200), (3000, 20), (100, 1)], seed=1)


def test_every_request_finishes_and_timestamps_ordered():
    sim = Simulator(_cfg())
    tr = sim.run(_reqs())
    assert not np.isnan(tr.finish).any()
    assert (tr.first_token >= tr.prefill_start).all() and (tr.finish >= tr.first_token).all()
    multi = tr.output > 1
    assert (tr.kv_ready[multi] >= tr.first_token[multi]).all()
    for u in sim.decode:
        u.alloc.check()
        assert u.alloc.used_blocks == 0
    s = summarize(sim, tr)
    # analytic decode: TPOT close to the single-sequence model at low load
    assert 1.5 < s.tpot_p50_ms < 4 and s.sla_attainment > 0.95


def _kv_cfg(kv_capacity_tokens: int, **kw):
    cfg = _cfg(**kw)
    dep = cfg.prefill.dep if kw.get("colocated") else cfg.decode.dep
    return dataclasses.replace(cfg, decode=dataclasses.replace(cfg.decode, dep=dep, kv_capacity_tokens=kv_capacity_tokens))


def test_tight_kv_refuses_handoffs_which_wait_for_blocks_and_complete():
    reqs = _reqs(200, rate=20)
    roomy = Simulator(_cfg())
    assert summarize(roomy, roomy.run(reqs)).kv_refusals == 0
    sim = Simulator(_kv_cfg(8192))
    tr = sim.run(reqs)
    assert not np.isnan(tr.finish).any()
    s = summarize(sim, tr)
    assert s.kv_refusals == sum(u.refusals for u in sim.decode) > 0
    waited = tr.kv_wait > 0  # refused until after their prefill ended: their KV left when blocks were freed
    assert waited.any() and (tr.kv_ready[waited] >= tr.first_token[waited] + tr.kv_wait[waited]).all()
    assert (tr.decode_wait_s()[waited] >= tr.kv_wait[waited]).all()  # the report counts it as decode_wait


def test_colocated_baseline_runs():
    sim = Simulator(_kv_cfg(0, colocated=True))
    tr = sim.run(_reqs(200))
    assert not np.isnan(tr.finish).any() and np.isnan(tr.kv_ready[tr.output == 1]).all()


def test_goodput_search_brackets():
    g = goodput(_cfg(), _reqs(300), iters=4)
    assert g.rate > 0 and all(0 <= a <= 1 for _, a in g.probes)


def test_sustained_goodput_stops_at_the_first_dip(monkeypatch):
    """Attainment that dips between 30 and 45 req/s and recovers: bisection lands in the recovery, the
    scan below the dip (every scanned rate under its answer passed)."""
    from orchestrator.simulator import search

    def run_once(cfg, reqs):
        rate = reqs[0].rid  # the fake's rescale carries the rate
        return SimpleNamespace(sla_attainment=1.0 if rate < 30 or 45 <= rate < 60 else 0.5)

    monkeypatch.setattr(search, "run_once", run_once)
    monkeypatch.setattr(search, "rescale", lambda reqs, rate: [SimpleNamespace(rid=rate)])
    assert 45 <= search.goodput(None, [], lo=8.0, hi=50.0, iters=8).rate < 60
    g = search.goodput(None, [], lo=8.0, hi=50.0, iters=8, scan_step=2 ** 0.25)
    assert 29 < g.rate < 30 and all(a == 1.0 for r, a in g.probes if r <= g.rate)
    with pytest.raises(ValueError, match="scan_step"):
        search.goodput(None, [], scan_step=1.0)


def test_full_conv_trace_runs_to_the_end():
    """The whole conv trace (19,366 requests; ~7 s here, not asserted: shared machines are noisy)."""
    reqs = from_trace(shared_data(CONV))
    assert len(reqs) == 19366
    tr = Simulator(_cfg()).run(reqs)
    assert not np.isnan(tr.finish).any()


def test_negative_rate_and_bad_trace(tmp_path):
    with pytest.raises(ValueError, match="rate"):
        poisson(-1, 10, [(1, 1)])
    bad = tmp_path / "t.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,abc,3\n")
    with pytest.raises(ValueError, match="t.csv:2"):
        from_trace(bad)


def test_experiment_validation_names_key(tmp_path):
    p = tmp_path / "c.yaml"
    good = {"model": "llama-3.1-70b", "trace": "x.csv", "sla": {"ttft_ms": 1000, "tpot_ms": 50},
            "prefill": {"hardware": "trn2.48xlarge", "replicas": [1, 2]}, "decode": {"hardware": "cs3"}}
    exps = parse_experiments({"experiments": {"e": good}}, p)
    assert exps["e"].prefill.replicas == (1, 2) and exps["e"].rates == (None,)
    with pytest.raises(ValueError, match=r"experiments\.e\.rates"):
        parse_experiments({"experiments": {"e": {**good, "rates": [-2]}}}, p)
    with pytest.raises(ValueError, match=r"experiments\.e\.sla: missing"):
        parse_experiments({"experiments": {"e": {k: v for k, v in good.items() if k != "sla"}}}, p)


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_bad_input_one_line(tmp_path):
    root = REPO
    cases = [("predict", "--model", "nope", "--hardware", "cs3"),
             ("predict", "--model", "llama-3.1-8b", "--hardware", "nope"),
             ("predict", "--model", "llama-3.1-405b", "--hardware", "h100", "--tp", "1"),
             ("plan", "--model", "llama-3.1-8b", "--rate", "-1", "--ttft-ms", "1", "--tpot-ms", "1"),
             ("simulate", "--config", str(tmp_path / "missing.yaml"))]
    for c in cases:
        r = _cli(*c, cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, (c, r.stderr)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("metadata:\n  experiments:\n    a:\n      model: llama-3.1-8b\n      trace: x.csv\n"
                   "      sla: {ttft_ms: 1, tpot_ms: 1}\n      prefill: {hardware: h100}\n      decode: {hardware: cs3}\n")
    r = _cli("simulate", "--config", str(cfg), "--experiment", "b", cwd=tmp_path)
    assert r.returncode == 2 and "valid: a" in r.stderr
    r = _cli("simulate", "--config", str(cfg), cwd=tmp_path)  # missing trace file
    assert r.returncode == 2 and "x.csv" in r.stderr and "Traceback" not in r.stderr
    r = _cli("predict", "--model", "llama-3.1-70b", "--hardware", "cs3", "--json", cwd=root)
    assert r.returncode == 0 and '"itl_ms"' in r.stdout


def test_colocated_overload_never_stalls():
    """Handoffs fill the pool while a preempted sequence waits for blocks: the unit keeps going only
    because the scheduler admits WAITING sequences (which hold their blocks) past a preempted one
    that does not fit (decode/scheduler.py); strict FIFO re-admission stalls it for good."""
    reqs = poisson(30.0, 600, [(1500, 400), (3000, 300), (200, 50)], seed=2)
    sim = Simulator(_kv_cfg(20_000, colocated=True))
    tr = sim.run(reqs)
    assert sum(u.preemptions for u in sim.decode) > 0 and sum(u.refusals for u in sim.decode) > 0
    assert not np.isnan(tr.finish).any()
    assert sum(u.sched.n_running + u.sched.n_waiting + len(u.refused) for u in sim.decode) == 0


def _tiny_trace(path: Path, n: int = 120) -> Path:
    rng = np.random.default_rng(0)
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for i in range(n):
        lines.append(f"2023-11-16 18:{15 + i // 60:02d}:{i % 60:02d}.{rng.integers(0, 99):02d},"
                     f"{rng.integers(50, 3000)},{rng.integers(1, 300)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_simulate_writes_results_with_goodput_baseline_and_attribution(tmp_path):
    import json
    root = REPO
    trace = _tiny_trace(tmp_path / "trace.csv")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"metadata:\n  experiments:\n    tiny:\n      model: llama-3.1-70b\n      trace: {trace}\n"
                   "      rates: [native, 4]\n      sla: {ttft_ms: 2000, tpot_ms: 50}\n"
                   "      prefill: {hardware: trn2.48xlarge, tp: 64, replicas: [1, 2], token_budget: 8192}\n"
                   "      decode: {hardware: cs3, systems: 4, replicas: 1}\n      colocated_baseline: true\n")
    r = _cli("simulate", "--config", str(cfg), "--experiment", "tiny", "--goodput", "--results", str(tmp_path / "res"),
             cwd=root)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "res" / "tiny"
    for f in ("results.csv", "summary.json", "requests.csv", "sla_vs_rate.png", "goodput_vs_pd.png", "latency_cdfs.png"):
        assert (out / f).stat().st_size > 0, f
    assert "SLO misses by phase" in r.stdout and "simulator speed: whole trace" in r.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["best_colocated_baseline"]["mode"] == "colocated"
    assert {c["mode"] for c in s["configurations"].values()} == {"disagg", "colocated"}
    assert all(c["goodput_rps"] >= 0 for c in s["configurations"].values())
    header = (out / "results.csv").read_text().splitlines()[0]
    assert "miss_queueing" in header and "kv_refusals" in header and "goodput_per_dollar_hour" in header and "sim_wall_s" in header
    r = _cli("simulate", "--config", str(cfg), "--rates", "native,-3", cwd=root)
    assert r.returncode == 2 and "--rates" in r.stderr and "Traceback" not in r.stderr


def test_quantile_override_sets_the_router_comparisons_confidence():
    from orchestrator.cli import UserError
    from orchestrator.cli.simulate import comparison_overrides, load_experiments
    exp = load_experiments(REPO / "cluster.yaml")["router-comparison"]
    assert comparison_overrides(exp, SimpleNamespace(quantile=None)) is exp
    assert comparison_overrides(exp, SimpleNamespace(quantile=0.6)).quantile == 0.6
    for bad in (0.0, 1.0, float("nan")):
        with pytest.raises(UserError, match="--quantile: must be in \\(0, 1\\)"):
            comparison_overrides(exp, SimpleNamespace(quantile=bad))


def test_plan_explains_choice(tmp_path):
    root = REPO
    trace = _tiny_trace(tmp_path / "trace.csv")
    r = _cli("plan", "--trace", str(trace), "--model", "llama-3.1-70b", "--rate", "30", "--ttft-ms", "2000",
             "--tpot-ms", "50", "--requests", "1500", cwd=root)
    assert r.returncode == 0, r.stderr
    assert "cheapest:" in r.stdout and "why:" in r.stdout and "prefill:" in r.stdout and "decode:" in r.stdout
    r = _cli("plan", "--trace", str(trace), "--model", "llama-3.1-70b", "--rate", "3", "--ttft-ms", "2000",
             "--tpot-ms", "0.1", cwd=root)  # below one token of the newest cs3 (~0.5 ms)
    assert r.returncode == 2 and "TPOT" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _host_cfg(**perf):
    """Both pools on a cpu-kind profile with measured tables (like the live bench on this host)."""
    from hardware.profiles import MeasuredTables
    t = MeasuredTables("smollm2-135m", (1, 2, 8, 64), (0.04, 0.10, 0.12, 0.30), 128, (1, 64), (8e-6, 6e-6),
                       (16, 512), (0.13, 1.2))
    base = get_profile("h100")
    hw = dataclasses.replace(base, name="cpu", kind="cpu", perf=dataclasses.replace(base.perf, measured=t, **perf))
    m = get_spec("smollm2-135m")
    dep = make_deployment(m, hw, dtype="fp32", kv_dtype="fp32")
    return SimConfig(PoolSetup(dep, 1, 8), PoolSetup(dep, 1, 64, block_tokens=64, kv_capacity_tokens=65536),
                     SLATarget(5000, 400), router_policy="least_loaded")


def test_shared_host_corun_slowdowns_apply():
    reqs = poisson(2.0, 40, [(50, 30), (300, 20)], seed=3)
    runs = {}
    for name, perf in (("none", {}), ("corun", dict(corun_slowdown_prefill=1.5, corun_slowdown_decode=1.3)),
                       ("path", dict(request_path_s=0.05))):
        tr = Simulator(_host_cfg(**perf)).run(reqs)
        assert not np.isnan(tr.finish).any()
        runs[name] = tr
    ttft = {k: np.median(v.first_token - v.arrival) for k, v in runs.items()}
    e2e = {k: np.median(v.finish - v.arrival) for k, v in runs.items()}
    assert ttft["corun"] > ttft["none"] and e2e["corun"] > e2e["none"] * 1.05
    assert ttft["path"] == pytest.approx(ttft["none"] + 0.05, abs=0.02)
    assert e2e["path"] == pytest.approx(e2e["none"] + 0.05, abs=0.02)  # the last token takes the path too
    # an idle request (the first) sees neither slowdown: measured tables only
    assert runs["corun"].first_token[0] - runs["corun"].arrival[0] == pytest.approx(0.13 + (50 - 16) * 1.07 / 496)


def test_local_prefill_takes_short_prompts_off_a_saturated_prefill_pool():
    """One Trn2 prefill replica past its capacity (the sla router rejects ~30% without local prefill): with
    conditional disaggregation the CS-3 decode unit prefills short prompts itself (no queue, no
    transfer), more requests are admitted and meet the SLA, and nothing is held at the end."""
    reqs = poisson(40.0, 300, [(200, 50), (1500, 200), (3000, 20), (100, 1)], seed=2)
    runs = {}
    for local in (0, 512):
        sim = Simulator(_cfg(router_policy="sla", local_prefill_max_tokens=local))
        tr = sim.run(reqs)
        runs[local] = (summarize(sim, tr), tr)
        for u in sim.decode:
            u.alloc.check()
            assert u.alloc.used_blocks == 0 and not u.local and u.prefilling_until is None
        done = ~np.isnan(tr.finish)
        assert (tr.first_token[done] >= tr.prefill_start[done]).all()
        assert (tr.finish[done] >= tr.first_token[done]).all()
    off, (on, tr) = runs[0][0], runs[512]
    assert off.local_prefills == 0 and on.local_prefills > 0
    assert on.local_prefills <= int((tr.prompt <= 512).sum())  # only prompts within the limit
    assert on.sla_attainment > off.sla_attainment and on.completed > off.completed


def test_chunked_local_prefill_rides_the_steps_and_bounds_what_it_adds_to_them(monkeypatch):
    """The same saturated pool with local prefills chunked 16 tokens a step: every admitted request
    ends and nothing is held; no segment's step is longer than the perf model's longest step plus one
    chunk; and the TPOT predictions are closer than with whole prefills stalling the batch."""
    reqs = poisson(40.0, 300, [(200, 50), (1500, 200), (3000, 20), (100, 1)], seed=2)
    longest, begin = [0.0], DecodeUnit.begin

    def timed(unit, now):
        seg = begin(unit, now)
        if seg is not None:
            longest[0] = max(longest[0], seg.step_s)
        return seg
    monkeypatch.setattr(DecodeUnit, "begin", timed)
    runs = {}
    for chunk in (0, 16):
        sim = Simulator(_cfg(router_policy="sla", local_prefill_max_tokens=512, local_prefill_chunk_tokens=chunk))
        longest[0] = 0.0
        tr = sim.run(reqs)
        for u in sim.decode:
            u.alloc.check()
            assert u.alloc.used_blocks == 0 and not u.local and u.local_tokens == 0 and u.prefilling_until is None
        assert not np.isnan(tr.finish[~tr.rejected]).any()
        done = ~np.isnan(tr.finish)
        assert (tr.first_token[done] >= tr.prefill_start[done]).all()
        runs[chunk] = (summarize(sim, tr), tr)
    assert runs[16][0].local_prefills > 0
    unit = sim.decode[0]
    assert longest[0] <= unit.step_seconds(64, 64 * (3000 + 200)) + chunk_step_time(unit.dep, 16)
    err = {k: np.nanmedian(np.abs(t.pred_tpot / t.tpot_s() - 1)) for k, (_, t) in runs.items()}
    assert err[16] < err[0]


def test_local_prefill_with_colocated_is_refused():
    with pytest.raises(ValueError, match="local_prefill_max_tokens"):
        Simulator(_cfg(colocated=True, local_prefill_max_tokens=256))


def test_the_decode_view_expects_sequences_at_the_rate_they_are_placed(monkeypatch):
    """With one decode unit every multi-token request is placed on it: 3 of the 4 length classes at 5 req/s."""
    seen, view = [], DecodeUnit.view

    def spy(unit, now):
        got = view(unit, now)
        if now > 20.0:  # past the meter's first window
            seen.append(got.state.arriving)
        return got
    monkeypatch.setattr(DecodeUnit, "view", spy)
    Simulator(_cfg()).run(_reqs())
    rates, steps = np.array(seen).T
    assert 0.75 * 3.75 < np.median(rates) < 1.25 * 3.75
    assert 20 < np.median(steps) < 200  # the mean of 49, 199 and 19 steps over a window's placements
