"""Software generations of the CS-3 profile: names, the speculative model's reductions, MoE sizing, acceptance."""
import argparse
import dataclasses
import json
import math

import pytest
import yaml

from hardware.generations import CS3_LAUNCH
from hardware.perf import (Speculative, decode_step_time, draft_room_bytes, kv_token_capacity, make_deployment,
                           speculation_plan, token_step_time, wafer_work_s)
from hardware.profiles import get_profile
from hardware.speculation import LEVIATHAN_LAMDA, acceptance_rate, draft_candidates, expected_tokens
from model.specs import ModelSpec, get_spec
from orchestrator.cli import predict
from orchestrator.core.config import ConfigError, load_config
from orchestrator.core.experiments import parse_experiments

M70 = get_spec("llama-3.1-70b")


def test_bare_name_is_the_newest_generation_and_explicit_names_pick_others():
    assert get_profile("cs3").name == "cs3@2024-10" and get_profile("cs3").generation.label == "speculative"
    assert get_profile("cs3@2024-08").generation.label == "launch"
    with pytest.raises(ValueError, match=r"unknown cs3 generation '2023-01'.*cs3@2024-08, cs3@2024-10"):
        get_profile("cs3@2023-01")


def test_speculative_step_reduces_to_the_launch_step_at_draft_length_zero():
    """With its own terms switched off (no kernel speedup, synchronous I/O, no drafts), the speculative
    generation is the launch one; with them on and k = 0, a step is one target pass: k draft steps cost
    nothing and the pass emits exactly one token."""
    launch, spec = get_profile("cs3@2024-08"), get_profile("cs3@2024-10")
    off = dataclasses.replace(spec, generation=dataclasses.replace(spec.generation, latency_speedup=1.0,
                                                                   async_io=False, max_draft_tokens=0))
    for batch, ctx in ((1, 1000), (16, 40_000)):
        assert token_step_time(make_deployment(M70, off, systems=4), batch, ctx) == \
            decode_step_time(make_deployment(M70, launch, systems=4), batch, ctx)
    dep = make_deployment(M70, spec, systems=4)
    plan = speculation_plan(dep)
    assert plan is not None and plan[0].draft_tokens >= 1
    zero = dataclasses.replace(plan[0], draft_tokens=0)
    assert token_step_time(dep, 8, 8000, zero, plan[1]) == decode_step_time(dep, 8, 8000)
    # the terms do act: the speculative generation's token is well under the launch's
    assert token_step_time(dep, 1, 1000) < 0.5 * decode_step_time(make_deployment(M70, launch, systems=4), 1, 1000)


def test_moe_needs_systems_for_total_params_but_compute_for_active_ones():
    """Llama 4 Maverick (17B active of 400B): SRAM must hold every expert (about 21 systems at 16-bit),
    while the compute of a step counts only the routed experts' parameters."""
    mav, cs3 = get_spec("llama-4-maverick"), get_profile("cs3")
    dep = make_deployment(mav, cs3)
    usable = cs3.mem_bytes * cs3.perf.mem_usable
    assert dep.chips == math.ceil(mav.params_total() * 2 / usable) >= 20
    # compute counts the active parameters that are multiplied (17B by Meta's count, which adds the embedding lookup)
    assert mav.matmul_params_per_token() == mav.params_active(count_input_embedding=False)
    assert abs(mav.params_active() / 17e9 - 1) < 0.03
    flops_s = 2.0 * mav.matmul_params_per_token() * 64 / (dep.chips * cs3.perf.wafer_dense_flops * cs3.perf.decode_mfu)
    work = wafer_work_s(dep, 64, 0.0)
    assert flops_s < work < 1.5 * flops_s  # plus the bytes of the experts hit, never the 400B
    # a dense model of Maverick's total size on the same systems does ~20x the work
    ffn = (mav.params_total() - 2 * mav.embedding_params - 48 * mav.attn_params_per_layer) // (48 * 3 * 5120)
    dense = ModelSpec("dense-400b", 48, 5120, 40, 8, 128, ffn, 202048, False)
    assert dense.params_total() == pytest.approx(mav.params_total(), rel=1e-3)
    assert wafer_work_s(make_deployment(dense, cs3, systems=dep.chips), 64, 0.0) > 15 * work


def test_acceptance_reproduces_its_source_and_grows_with_the_draft():
    def spec(params):  # a dense stand-in with `params` parameters (only the count matters here)
        d = int(math.sqrt(params / 12 / 10))
        return ModelSpec(f"x{params:g}", 10, d, 1, 1, d, 4 * d, 1, True)
    for draft, target, published in LEVIATHAN_LAMDA:
        assert acceptance_rate(spec(draft), spec(target)) == pytest.approx(published, abs=0.02)
    a1, a8 = acceptance_rate(get_spec("llama-3.2-1b"), M70), acceptance_rate(get_spec("llama-3.1-8b"), M70)
    assert 0.5 < a1 < a8 < 0.85
    assert expected_tokens(0.0, 5) == 1.0 and expected_tokens(1.0, 3) == 4.0
    assert expected_tokens(a1, 3) == pytest.approx(Speculative(a1, 3).tokens_per_step())


def test_drafts_share_the_tokenizer_and_occupy_sram():
    assert [s.name for s in draft_candidates(M70)][:2] == ["llama-3.2-1b", "llama-3.1-8b"]
    # Maverick's one smaller sibling, Scout (216 GB at 16-bit), fits no system's share of the free SRAM
    maverick = make_deployment(get_spec("llama-4-maverick"), get_profile("cs3"))
    assert [s.name for s in draft_candidates(maverick.model)] == ["llama-4-scout"]
    assert get_spec("llama-4-scout").weight_bytes() > draft_room_bytes(maverick)
    assert speculation_plan(maverick) is None
    assert speculation_plan(make_deployment(M70, get_profile("cs3@2024-08"), systems=4)) is None
    spec = make_deployment(M70, get_profile("cs3"), systems=4)
    launch = make_deployment(M70, get_profile("cs3@2024-08"), systems=4)
    assert 0 < kv_token_capacity(spec) < kv_token_capacity(launch)  # the draft's weights and KV take SRAM


def test_a_target_tuned_on_other_outputs_gets_no_draft_from_its_base_family():
    """DeepSeek R1 Distill Llama 70B has Llama 3.3 70B's architecture and tokenizer but is tuned on R1's
    outputs, outside the acceptance line's domain: no registered draft, so it decodes plainly, while its
    base keeps the Llama 3.2 1B draft on the same systems."""
    cs3, distill, base = get_profile("cs3"), get_spec("deepseek-r1-distill-llama-70b"), get_spec("llama-3.3-70b")
    assert distill.vocab_size == base.vocab_size and distill.params_total() == base.params_total()
    assert draft_candidates(distill) == () and draft_candidates(get_spec("perplexity-sonar")) == ()
    assert speculation_plan(make_deployment(distill, cs3, systems=4)) is None
    assert speculation_plan(make_deployment(base, cs3, systems=4))[1].model.name == "llama-3.2-1b"


def test_a_draft_needs_one_systems_share_of_the_free_sram():
    """Llama 3.1 405B on the 21 systems its weights need leaves about 1 GB free per system: Llama 3.2 1B
    (2.5 GB) fits the 21 systems' free SRAM in total but no one system, so there is no draft; on 22 it fits."""
    cs3, m405, draft = get_profile("cs3"), get_spec("llama-3.1-405b"), get_spec("llama-3.2-1b")
    tight, roomy = make_deployment(m405, cs3, systems=21), make_deployment(m405, cs3, systems=22)
    assert draft_room_bytes(tight) < draft.weight_bytes() < draft_room_bytes(tight) * tight.chips
    assert speculation_plan(tight) is None
    assert speculation_plan(roomy)[0].draft_model == "llama-3.2-1b"
    assert token_step_time(tight, 1, 1000) == decode_step_time(tight, 1, 1000)  # one pass per token


def test_speculative_step_is_linear_in_context_and_monotone_in_batch():
    """The simulator sums steps in closed form (linear in ctx_sum) and the pair search bounds a step from
    below by the step in flight (monotone): both must hold with the generation's own speculation."""
    dep = make_deployment(M70, get_profile("cs3"), systems=4)
    a, b, c = (token_step_time(dep, 8, x) for x in (8000, 16_000, 24_000))
    assert b - a == pytest.approx(c - b, rel=1e-9) and b > a
    assert token_step_time(dep, 64, 64 * 1000) > token_step_time(dep, 8, 8 * 1000)


def test_launch_generation_has_no_terms():
    assert (CS3_LAUNCH.latency_speedup, CS3_LAUNCH.async_io, CS3_LAUNCH.speculative) == (1.0, False, False)


def _config(tmp_path, decode_hw: str):
    path = tmp_path / "cluster.yaml"
    path.write_text(
        "metadata:\n  model: {name: smollm2-135m}\n"
        "  pools:\n    prefill: {workers: 1, hardware: cpu}\n"
        f"    decode: {{workers: 1, hardware: {decode_hw!r}}}\n"
        "  sla_classes: {standard: {ttft_ms: 5000, tpot_ms: 400}}\n"
        "  workload: {trace: t.csv, requests: 4}\n"
        "  experiments:\n    e:\n      model: llama-3.1-70b\n      trace: t.csv\n      sla: {ttft_ms: 1, tpot_ms: 1}\n"
        f"      prefill: {{hardware: trn2.48xlarge}}\n      decode: {{hardware: {decode_hw!r}}}\n")
    return path


def test_config_naming_an_unknown_generation_fails_at_load_with_file_key_and_known_names(tmp_path):
    assert load_config(_config(tmp_path, "cs3@2024-08")).decode.hardware == "cs3@2024-08"
    path = _config(tmp_path, "cs3@2023-01")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: metadata.pools.decode.hardware: unknown cs3 generation '2023-01'")
    assert "cs3@2024-08, cs3@2024-10" in msg
    with pytest.raises(ValueError, match=r"metadata\.experiments\.e\.decode\.hardware: .*cs3@2024-08, cs3@2024-10"):
        parse_experiments(yaml.safe_load(path.read_text())["metadata"], path)


def test_predict_picks_the_newest_generation_for_cs3_and_another_by_name(capsys):
    parser = argparse.ArgumentParser()
    predict.add_arguments(parser)
    out = {}
    for hw in ("cs3", "cs3@2024-08"):
        predict.run(parser.parse_args(["--model", "llama-3.1-70b", "--hardware", hw, "--systems", "4", "--json"]))
        out[hw] = json.loads(capsys.readouterr().out)
    new, old = out["cs3"], out["cs3@2024-08"]
    assert (new["hardware"], new["generation"], new["speculative"]) == ("cs3@2024-10", "speculative", True)
    assert new["draft_model"] in ("llama-3.2-1b", "llama-3.1-8b") and new["draft_tokens"] >= 1
    assert (old["generation"], old["speculative"], old["draft_tokens"]) == ("launch", False, 0)
    assert new["tokens_per_s_per_user"] > 3 * old["tokens_per_s_per_user"]
