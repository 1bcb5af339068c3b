"""The live engine's performance model: the live model on this host's measured `cpu` profile.

The router's predictor times the live workers with hardware/perf.py exactly as the simulator times
its units; the `cpu` profile (hardware/cpu.py, measured by `python -m bench.cpu_profile`, which
`bench` and `serve` run first) is the prior and the predictor's corrections learn the rest. A
process that starts a deployment on an unmeasured host (a test, a library user) gets a nominal
roofline prior instead, with a warning: the corrections then learn the whole ratio, from the first
few batches and steps.
"""
from __future__ import annotations

import structlog

from hardware.cpu import CpuMeasurement, NotMeasured, cpu_profile, fingerprint, profile_from
from hardware.perf import Deployment, make_deployment
from model.specs import get_spec

log = structlog.get_logger("perfmodel")

# A nominal 2020s laptop/VM core at 1 BLAS thread (assumptions, not a measurement): 50 GFLOP/s
# sgemm, 5 GB/s streaming read, 30 us per layer, half of peak in both phases.
NOMINAL = CpuMeasurement(sgemm_flops=50e9, stream_bw=5e9, layer_overhead_s=30e-6, decode_mfu=0.5, prefill_mfu=0.5,
                         mem_bytes=8e9, engine_measured=False, fingerprint="nominal")


def live_deployment(model_name: str) -> tuple[Deployment, bool]:
    """The live model on the `cpu` profile, and whether the profile is this host's measurement."""
    try:
        hw, measured = cpu_profile(), True
    except NotMeasured as e:
        log.warning("the router predicts from a nominal cpu profile until its corrections learn", reason=str(e),
                    host=fingerprint())
        hw, measured = profile_from(NOMINAL), False
    return make_deployment(get_spec(model_name), hw, dtype=hw.default_dtype, kv_dtype=hw.default_dtype), measured
