"""`predict`: TTFT, inter-token latency and tokens/s of one model on one hardware configuration."""
from __future__ import annotations

import argparse
import json

from orchestrator.cli import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model spec name, e.g. llama-3.1-70b")
    p.add_argument("--hardware", required=True,
                   help="hardware profile, e.g. trn2.48xlarge, h100, cpu, cs3 (the newest CS-3 software generation, "
                        "cs3@2024-10) or an explicit one (cs3@2024-08: the launch)")
    p.add_argument("--tp", type=int, help="tensor-parallel ranks (HBM devices)")
    p.add_argument("--systems", type=int, help="units per replica (wafer: pipelined CS-3 systems)")
    p.add_argument("--input-tokens", type=int, default=1000)
    p.add_argument("--output-tokens", type=int, default=200, help="context growth assumed for ITL")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", help="weight dtype (default: the profile's, bf16 or fp32 on cpu)")
    p.add_argument("--speculative", action="store_true",
                   help="explicit speculative decoding (defaults in hardware.perf.Speculative), replacing the "
                        "generation's own draft plan")
    p.add_argument("--acceptance", type=float, default=0.8, help="draft-token acceptance rate with --speculative")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    from hardware.perf import (Speculative, inter_token_latency, kv_token_capacity, make_deployment,
                               prefill_time, speculation_plan)
    from hardware.profiles import get_profile
    from model.specs import get_spec
    for name in ("input_tokens", "batch", "output_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}: must be >= 1")
    if not 0 <= args.acceptance <= 1:
        raise UserError("--acceptance: must lie in [0, 1]")
    if args.hardware == "cpu":
        from bench.cpu_profile import ensure_measured
        ensure_measured()  # the `cpu` profile is this host's measurement: an explicit, announced step
    try:
        model, hw = get_spec(args.model), get_profile(args.hardware)
        dtype = args.dtype or hw.default_dtype
        dep = make_deployment(model, hw, args.tp, args.systems, dtype, dtype)
        spec = draft = None
        if args.speculative:
            spec = Speculative(acceptance=args.acceptance)
            draft = make_deployment(get_spec(spec.draft_model), hw, dtype=dtype, kv_dtype=dtype)
    except ValueError as e:
        raise UserError(str(e)) from None
    ctx = args.input_tokens + args.output_tokens // 2
    ttft = prefill_time(dep, [args.input_tokens] * args.batch)
    itl = inter_token_latency(dep, args.batch, ctx, spec, draft)
    if spec is None and (plan := speculation_plan(dep)) is not None:
        spec = plan[0]  # the generation's own speculative decoding, as inter_token_latency applied it
    out = {
        "model": model.name, "hardware": hw.name, "generation": hw.generation.label if hw.generation else None,
        "dtype": dtype, "chips": dep.chips, "units": dep.units,
        "tp": dep.tp if hw.kind != "wafer" else None, "batch": args.batch, "input_tokens": args.input_tokens,
        "speculative": spec is not None, "draft_model": spec.draft_model if spec else None,
        "draft_tokens": spec.draft_tokens if spec else 0, "acceptance": spec.acceptance if spec else None,
        "ttft_s": ttft, "itl_ms": itl * 1e3,
        "tokens_per_s_per_user": 1.0 / itl, "tokens_per_s_total": args.batch / itl,
        "kv_token_capacity": kv_token_capacity(dep), "price_per_hour": dep.price_per_hour,
        "power_kw": dep.power_kw,
    }
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:24s} {v:.4g}" if isinstance(v, float) else f"{k:24s} {v}")
    return 0
