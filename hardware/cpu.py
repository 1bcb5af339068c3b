"""The `cpu` profile, measured on this host so the simulator can predict the live numpy system.

How it is measured (`bench/cpu_profile.py`, about 25-30 s, an explicit step; cached as JSON in
~/.cache/pdorchestrator/cpu_profile.json, or $PDO_CACHE_DIR, keyed by a host fingerprint):

1. sgemm FLOP/s: float32 (1024 x 1024) @ (1024 x 1024) with numpy's BLAS, best of a few runs.
2. streaming read bandwidth: sum of a 256 MB float32 array, best of a few runs.
3. the live engine (SmolLM2-135M fp32), exactly the workers' hot paths, median of 3 after a warm-up:
   - decode step tables: DecodeCore.forward + sample over a PagedKVPool (decode/worker.py's step) at
     DECODE_BATCHES sequences of DECODE_REF_CTX cached tokens, and again at SLOPE_CTX for
     SLOPE_BATCHES, giving the extra seconds per cached token (attention) at those batches;
   - prefill table: one Transformer.prefill_batch call (prefill/worker.py) of PREFILL_TOKENS tokens.
   hardware/perf.py interpolates these (PerfParams.measured) for the live model instead of the
   roofline: at 1 BLAS thread a step is not roofline-shaped (measured 2026-12-01, cache version 8,
   Zen 5 with OpenBLAS's Haswell kernels: ~20 ms at batch 1, ~27 at 2, ~62 at 8, ~96 at 16, ~241 at
   64; see decode/projection.py). The legacy analytic coefficients
   (per-layer overhead, decode/prefill MFU) are still derived from them for other models on `cpu`.
4. serving overheads of the live stack (optional, a separate ~40 s run because it starts local
   Ray: `python -m bench.serving_overheads`, cached as serving.json next to this cache, same
   fingerprint): the prefill worker's time beyond prefill_batch (KV send/commit, per request and
   per token), the frontend/Ray/gRPC latency added to TTFT, the per-token streaming overhead, and
   the co-run slowdowns of prefill and decode sharing the host's cores. See that module.

KV moves over loopback gRPC in the live system: 0.8 GB/s (DESIGN.md's measured figure) is assumed.
Price and power of the host are nominal assumptions ($0.10/h, 65 W).
Everything is measured with MEASURE_BLAS_THREADS BLAS threads: what each live worker actor gets
(cluster.yaml: pools.*.blas_threads), since prefill and decode actors share the host's cores.
`python -m bench.cpu_profile` prints the cached figures (measuring when absent); `--remeasure` measures again (do it on a quiet
machine: other load inflates the timings). This VM's co-run behaviour varies over minutes (a tight
loop of prefill next to a decode loop measured 1.0x at one time and ~2x at another), so measure
close to the live runs being compared and note the load.
"""
from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from hardware.profiles import HardwareProfile, MeasuredTables, PerfParams

CACHE_VERSION = 8  # 4: decode core runs small batches as row blocks (decode/projection.py); 5: denser batches;
# 6: the step's weights in one arena (faster steps at every batch); 7: vector blocks for small batches on
# OpenBLAS cores without the small-matrix kernel; 8: GEMV attention on those cores, one pass per block
MEASURE_BLAS_THREADS = 1  # per live actor (cluster.yaml pools.*.blas_threads)


@dataclass(frozen=True, slots=True)
class CpuMeasurement:
    sgemm_flops: float
    stream_bw: float  # B/s
    layer_overhead_s: float
    decode_mfu: float
    prefill_mfu: float
    mem_bytes: float
    engine_measured: bool  # False: engine figures are defaults (model wheel missing)
    fingerprint: str
    # tables of the live engine (empty without the model wheel): see DECODE_BATCHES etc. below
    decode_step_s: tuple[float, ...] = ()  # per DECODE_BATCHES, at DECODE_REF_CTX tokens per sequence
    decode_ctx_slope_s: tuple[float, ...] = ()  # per SLOPE_BATCHES: s per extra cached token (batch total)
    prefill_s: tuple[float, ...] = ()  # per PREFILL_TOKENS

    def tables(self) -> MeasuredTables | None:
        if not self.decode_step_s:
            return None
        return MeasuredTables(ENGINE_MODEL, DECODE_BATCHES, tuple(self.decode_step_s), DECODE_REF_CTX,
                              SLOPE_BATCHES, tuple(self.decode_ctx_slope_s), PREFILL_TOKENS, tuple(self.prefill_s))


def fingerprint() -> str:
    """Identifies this host and the measurement's version: a cache from elsewhere is not used."""
    return (f"{platform.node()}|{platform.machine()}|{os.cpu_count()}|numpy {np.__version__}"
            f"|threads {MEASURE_BLAS_THREADS}|v{CACHE_VERSION}")


def cache_path() -> Path:
    base = Path(os.environ.get("PDO_CACHE_DIR", Path.home() / ".cache" / "pdorchestrator"))
    return base / "cpu_profile.json"


def serving_path() -> Path:
    """Serving overheads of the live stack (bench/serving_overheads.py writes it; optional)."""
    return cache_path().with_name("serving.json")


def load_serving(fingerprint: str) -> dict | None:
    """The measured serving overheads for this host, or None (absent, corrupt or another host)."""
    try:
        d = json.loads(serving_path().read_text())
    except (OSError, ValueError):
        return None
    return d if d.get("fingerprint") == fingerprint else None


# decode-step table (live decode max_batch is 64). Dense below 16: with the small-kernel row blocks
# (decode/projection.py) the step is not linear between powers of two (1 thread, context 128:
# B=3 71 ms vs 66 at B=4; B=5 80 ms vs 71 interpolated from 4 and 8; B=10 116 vs 99).
DECODE_BATCHES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 64)
DECODE_REF_CTX = 128  # cached tokens per sequence in the decode-step table
SLOPE_BATCHES = (1, 8, 32)  # batches re-measured at SLOPE_CTX for the per-token attention slope
SLOPE_CTX = 512
PREFILL_TOKENS = (16, 64, 128, 256, 512)  # one prefill_batch call (the bench's prompts are <= 512)
ENGINE_MODEL = "smollm2-135m"  # the live engine's model (model/specs.py name; DESIGN.md)


def load_cached() -> CpuMeasurement | None:
    """This host's cached measurement, or None (absent, corrupt, from another host or cache version)."""
    try:
        raw = json.loads(cache_path().read_text())
        m = CpuMeasurement(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    except (OSError, ValueError, TypeError):
        return None
    return m if m.fingerprint == fingerprint() else None


def save(m: CpuMeasurement) -> Path:
    """Cache a measurement of this host (bench/cpu_profile.py measures it)."""
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(m), indent=1))
    return path


class NotMeasured(ValueError):
    """The `cpu` profile was asked for on a host that has not been measured yet."""


def profile_from(m: CpuMeasurement) -> HardwareProfile:
    """The `cpu` HardwareProfile of a measurement (fp32 weights, like the live engine)."""
    sv = load_serving(m.fingerprint) or {}
    perf = PerfParams(prefill_mfu=m.prefill_mfu, decode_mfu=m.decode_mfu, bw_eff=1.0,
                      layer_overhead_s=m.layer_overhead_s, net_eff=1.0, net_latency_s=200e-6,
                      mem_usable=0.5, measured=m.tables(),
                      corun_slowdown_prefill=max(1.0, sv.get("corun_slowdown_prefill", 1.0)),
                      corun_slowdown_decode=max(1.0, sv.get("corun_slowdown_decode", 1.0)),
                      prefill_extra_s=max(0.0, sv.get("prefill_extra_s", 0.0)),
                      prefill_extra_per_token_s=max(0.0, sv.get("prefill_extra_per_token_s", 0.0)),
                      request_path_s=max(0.0, sv.get("request_path_s", 0.0)),
                      token_overhead_batches=tuple(sv.get("token_overhead_batches", ())),
                      token_overhead_s=tuple(max(0.0, x) for x in sv.get("token_overhead_s", ())))
    return HardwareProfile("cpu", "cpu", 1, 1, m.sgemm_flops, m.sgemm_flops, m.mem_bytes, m.stream_bw,
                           0.0, 0.8e9, 0.10, 0.065, perf, "fp32",
                           ("measured on this host by bench.cpu_profile.measure_host",
                            "net: DESIGN.md loopback gRPC 0.65-0.9 GB/s", "price/power: assumptions"))


def cpu_profile() -> HardwareProfile:
    """The `cpu` profile from this host's cached measurement; NotMeasured says how to measure it.

    A lookup never measures: measuring takes ~30 s and is an explicit step (bench/cpu_profile.py,
    which `simulate` and `predict` run, saying so, when the profile is needed and absent)."""
    m = load_cached()
    if m is None:
        raise NotMeasured(f"hardware: the `cpu` profile of this host is not measured yet (no valid {cache_path()}); "
                          "run `python -m bench.cpu_profile` (~30 s) first")
    return profile_from(m)


