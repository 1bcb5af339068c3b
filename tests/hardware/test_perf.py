"""Performance model: the calibration fits and the unfitted rows, capacity, speculative option,
transfer overlap, cpu cache."""
import dataclasses
import json

import pytest

from bench.calibration import calibration_table, fit_latency_speedup
from hardware.perf import (Speculative, decode_step_time, kv_token_capacity, kv_transfer_time, make_deployment,
                           prefill_time, token_step_time)
from hardware.profiles import HARDWARE_NAMES, PROFILES, get_profile
from model.specs import get_spec


def test_fit_reproduces_the_rows_it_was_fitted_to():
    """Five coefficients were each solved from one of these figures (bench/calibration.py), so these
    rows match by construction: this checks the fit and the model's form, it validates nothing."""
    fitted = [r for r in calibration_table() if r.fitted]
    assert len(fitted) == 5
    for r in fitted:
        assert abs(r.error) < 0.03, r


def test_stored_speculative_coefficient_is_the_fit():
    """hardware/generations.py holds the value fit_latency_speedup() solves: re-solving agrees to 0.1%."""
    stored = get_profile("cs3@2024-10").generation.latency_speedup
    assert fit_latency_speedup() == pytest.approx(stored, rel=1e-3)


def test_every_unfitted_row_has_a_source_and_a_real_prediction():
    """The validation rows are predictions, not copies: each names where its figure was published,
    and no prediction equals its figure to 4 digits (which would mean it was fitted after all)."""
    rows = [r for r in calibration_table() if not r.fitted]
    assert len(rows) >= 10 and {r.setup.split()[0] for r in rows} >= {"trn2.48xlarge", "trn1.32xlarge", "cs3@2024-10"}
    for r in rows:
        assert "[" in r.source and r.predicted > 0 and abs(r.error) > 1e-4, r


def test_every_profile_has_sources_price_power():
    for p in PROFILES.values():
        assert p.sources and p.price_per_hour > 0 and p.power_kw > 0


def test_wafer_capacity_matches_published_system_counts():
    cs3 = get_profile("cs3")
    assert make_deployment(get_spec("llama-3.1-8b"), cs3).chips == 1
    assert make_deployment(get_spec("llama-3.1-70b"), cs3).chips == 4  # "as few as four systems"
    assert 19 <= make_deployment(get_spec("llama-3.1-405b"), cs3).chips <= 22  # HN estimates 19-22
    assert 0 < kv_token_capacity(make_deployment(get_spec("llama-3.1-70b"), cs3)) < 100_000


def test_does_not_fit_names_model_and_need():
    with pytest.raises(ValueError, match="llama-3.1-405b.*does not fit h100.*needs"):
        make_deployment(get_spec("llama-3.1-405b"), get_profile("h100"), tp=2)
    with pytest.raises(ValueError, match="valid: .*cs3"):
        get_profile("tpu9")
    assert "cpu" in HARDWARE_NAMES


def test_monotone_in_batch_and_context():
    d = make_deployment(get_spec("llama-3.1-70b"), get_profile("trn2.48xlarge"), tp=64)
    assert decode_step_time(d, 64, 64 * 2000) > decode_step_time(d, 1, 2000)
    assert prefill_time(d, [4000]) > 2 * prefill_time(d, [1000]) * 0.9


def test_speculative_tokens_per_step():
    assert Speculative(acceptance=0.0).tokens_per_step() == 1.0
    assert Speculative(acceptance=1.0, draft_tokens=3).tokens_per_step() == 4.0


def test_kv_fill_pass_adds_one_draft_pass_and_no_token():
    """NxDI fused speculation runs the draft once more per step, only to cache its last draft's KV: the
    step costs one more draft pass over the same tokens, on HBM devices and on the wafer alike."""
    for hw, model, draft_model in (("trn2.48xlarge", "llama-3.3-70b", "llama-3.2-1b"), ("cs3", "llama-3.1-70b",
                                                                                      "llama-3.2-1b")):
        target = make_deployment(get_spec(model), get_profile(hw))
        draft = make_deployment(get_spec(draft_model), get_profile(hw))
        plain = Speculative(0.9, 6, draft_model)
        fused = dataclasses.replace(plain, kv_fill_pass=True)
        assert (fused.draft_passes, fused.tokens_per_step()) == (7, plain.tokens_per_step())
        batch, ctx = 2, 2 * 3000
        extra = decode_step_time(draft, batch, ctx + batch * 6) / plain.tokens_per_step()
        assert (token_step_time(target, batch, ctx, fused, draft) - token_step_time(target, batch, ctx, plain, draft)
                == pytest.approx(extra, rel=1e-9))


def test_layerwise_overlap_hides_transfer():
    m = get_spec("llama-3.1-70b")
    src, dst = make_deployment(m, get_profile("trn2.48xlarge"), tp=64), make_deployment(m, get_profile("cs3"))
    kv = m.kv_bytes(8000)
    assert kv_transfer_time(src, dst, kv, prefill_s=10.0) < kv_transfer_time(src, dst, kv, prefill_s=0.0) / 10


def test_cpu_profile_from_cache(tmp_path, monkeypatch):
    from hardware import cpu
    monkeypatch.setenv("PDO_CACHE_DIR", str(tmp_path))
    m = cpu.CpuMeasurement(1.9e11, 3e10, 1e-4, 0.5, 0.6, 8e9, True, cpu.fingerprint())
    (tmp_path / "cpu_profile.json").write_text(json.dumps({f: getattr(m, f) for f in m.__slots__}))
    p = get_profile("cpu")
    assert p.flops_bf16 == 1.9e11 and p.default_dtype == "fp32"
    d = make_deployment(get_spec("smollm2-135m"), p, dtype="fp32", kv_dtype="fp32")
    assert 0.005 < decode_step_time(d, 1, 100) < 0.1


def _tables(model="smollm2-135m"):
    from hardware.profiles import MeasuredTables
    return MeasuredTables(model, (1, 2, 4, 8), (0.04, 0.10, 0.11, 0.12), 128, (1, 8), (8e-6, 6e-6),
                          (16, 64, 256), (0.13, 0.21, 0.55))


def _cpu_like(**perf):
    p = get_profile("h100")
    return dataclasses.replace(p, name="cpu", kind="cpu", perf=dataclasses.replace(p.perf, measured=_tables(), **perf))


def test_measured_tables_interpolate_and_extrapolate():
    m = get_spec("smollm2-135m")
    d = make_deployment(m, _cpu_like(), dtype="fp32", kv_dtype="fp32")
    assert decode_step_time(d, 1, 128) == pytest.approx(0.04)
    assert decode_step_time(d, 3, 3 * 128) == pytest.approx(0.105)  # between batch 2 and 4
    assert decode_step_time(d, 16, 16 * 128) == pytest.approx(0.12 + 8 * 0.01 / 4)  # past the last point
    # context slope: linear in ctx_sum for a fixed batch (the simulator sums steps in closed form)
    a, b, c = (decode_step_time(d, 4, 4 * x) for x in (128, 256, 384))
    assert b - a == pytest.approx(c - b) and b - a == pytest.approx(4 * 128 * (8e-6 - 3 * 2e-6 / 7))
    assert prefill_time(d, [64]) == pytest.approx(0.21)
    assert prefill_time(d, [32, 32]) == pytest.approx(0.21)  # one batched call: by total tokens
    # measured serving extras of the live worker add per request and per token
    d2 = make_deployment(m, _cpu_like(prefill_extra_s=0.01, prefill_extra_per_token_s=1e-4,
                                      token_overhead_batches=(1, 8), token_overhead_s=(0.002, 0.009)),
                         dtype="fp32", kv_dtype="fp32")
    assert prefill_time(d2, [32, 32]) == pytest.approx(0.21 + 2 * 0.01 + 64e-4)
    assert decode_step_time(d2, 1, 128) == pytest.approx(0.042)


def test_measured_tables_only_for_their_model():
    big = get_spec("llama-3.1-8b")
    hw = _cpu_like()
    plain = dataclasses.replace(hw, perf=dataclasses.replace(hw.perf, measured=None))
    d, d0 = make_deployment(big, hw), make_deployment(big, plain)
    assert decode_step_time(d, 4, 1000) == decode_step_time(d0, 4, 1000)
    assert prefill_time(d, [500]) == prefill_time(d0, [500])
