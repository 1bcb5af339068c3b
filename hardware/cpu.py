"""The `cpu` profile, measured on this host so the simulator can predict the live numpy system.

How it is measured (`measure_host`, about 10-20 s, once; cached as JSON in
~/.cache/pdorchestrator/cpu_profile.json, or $PDO_CACHE_DIR, keyed by a host fingerprint):

1. sgemm FLOP/s: float32 (1024 x 1024) @ (1024 x 1024) with numpy's BLAS, best of a few runs.
2. streaming read bandwidth: sum of a 256 MB float32 array, best of a few runs.
3. the live engine (SmolLM2-135M fp32): one step of the decode worker's paged core
   (decode.core.DecodeCore) at batch 1 and batch 16 and one 256-token prefill (model.transformer). Batch 1 is memory-bound, so its time minus weight bytes / bandwidth
   gives the per-layer overhead; batch 16 then gives decode MFU and the prefill gives prefill MFU
   (fractions of the sgemm rate). Without the model wheel, documented defaults are used.

KV moves over loopback gRPC in the live system: 0.8 GB/s (DESIGN.md's measured figure) is assumed.
Price and power of the host are nominal assumptions ($0.10/h, 65 W).
Everything is measured with MEASURE_BLAS_THREADS BLAS threads: what each live worker actor gets
(cluster.yaml: pools.*.blas_threads), since prefill and decode actors share the host's cores.
`python -m hardware.cpu` prints the cached figures; `--remeasure` measures again (do it on a quiet
machine: the engine figures are best-of-3 timings and other load inflates them).
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from hardware.profiles import HardwareProfile, PerfParams

CACHE_VERSION = 2
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


def _fingerprint() -> str:
    return (f"{platform.node()}|{platform.machine()}|{os.cpu_count()}|numpy {np.__version__}"
            f"|threads {MEASURE_BLAS_THREADS}|v{CACHE_VERSION}")


def cache_path() -> Path:
    base = Path(os.environ.get("PDO_CACHE_DIR", Path.home() / ".cache" / "pdorchestrator"))
    return base / "cpu_profile.json"


def _best(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _measure_engine(sgemm: float, bw: float) -> tuple[float, float, float] | None:
    """(layer_overhead_s, decode_mfu, prefill_mfu) of the live engine, or None without the model."""
    try:
        from decode.core import DecodeCore, model_layout
        from decode.pool import PagedKVPool
        from model.loaded import load_model
        lm = load_model()
    except Exception:
        return None
    from model.specs import spec_from_config
    cfg, spec, tr = lm.weights.config, spec_from_config(lm.weights.config), lm.model
    ids = np.arange(1, 65) % cfg.vocab_size
    _, ks, vs = tr.prefill(ids)

    def step_time(batch: int) -> float:
        """One decode step of `batch` sequences at context 64 on the live worker's paged core."""
        pool = PagedKVPool(model_layout(tr), 64, capacity_tokens=batch * 192)
        core = DecodeCore(tr, pool, threads=MEASURE_BLAS_THREADS)
        rids = [f"s{i}" for i in range(batch)]
        for rid in rids:
            pool.load_sequence(rid, ks, vs)
        step = core.batch_input(rids, [5] * batch, [64] * batch)  # rewrites position 64 each time
        return _best(lambda: core.forward(step), 3)

    t1, t16 = step_time(1), step_time(16)
    memory = spec.active_weight_bytes("fp32") / bw
    layer_overhead = max(0.0, (t1 - memory) / cfg.n_layers)
    fixed = layer_overhead * cfg.n_layers
    decode_mfu = min(1.0, 16 * spec.decode_flops(64) / max(t16 - fixed, 1e-9) / sgemm)
    prompt = np.arange(1, 257) % cfg.vocab_size
    tp = _best(lambda: tr.prefill(prompt), 2)
    prefill_mfu = min(1.0, spec.prefill_flops(256) / max(tp - fixed, 1e-9) / sgemm)
    return layer_overhead, decode_mfu, prefill_mfu


def measure_host() -> CpuMeasurement:
    """Measure this host (takes seconds; see the module docstring)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(MEASURE_BLAS_THREADS):
        return _measure()


def _measure() -> CpuMeasurement:
    a = np.random.default_rng(0).standard_normal((1024, 1024), dtype=np.float32)
    sgemm = 2 * 1024**3 / _best(lambda: a @ a, 5)
    big = np.ones(64 * 2**20, dtype=np.float32)  # 256 MB
    bw = big.nbytes / _best(big.sum, 5)
    engine = _measure_engine(sgemm, bw)
    layer_overhead, decode_mfu, prefill_mfu = engine or (30e-6, 0.5, 0.5)
    mem = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return CpuMeasurement(sgemm, bw, layer_overhead, decode_mfu, prefill_mfu, mem, engine is not None,
                          _fingerprint())


def load_or_measure(remeasure: bool = False) -> CpuMeasurement:
    """The cached measurement of this host, measuring (and caching) it when absent or stale."""
    path = cache_path()
    if not remeasure and path.exists():
        try:
            m = CpuMeasurement(**json.loads(path.read_text()))
            if m.fingerprint == _fingerprint():
                return m
        except (ValueError, TypeError):
            pass  # corrupt or old cache: measure again
    m = measure_host()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(m), indent=1))
    return m


def profile_from(m: CpuMeasurement) -> HardwareProfile:
    """The `cpu` HardwareProfile of a measurement (fp32 weights, like the live engine)."""
    perf = PerfParams(prefill_mfu=m.prefill_mfu, decode_mfu=m.decode_mfu, bw_eff=1.0,
                      layer_overhead_s=m.layer_overhead_s, net_eff=1.0, net_latency_s=200e-6,
                      mem_usable=0.5)
    return HardwareProfile("cpu", "cpu", 1, 1, m.sgemm_flops, m.sgemm_flops, m.mem_bytes, m.stream_bw,
                           0.0, 0.8e9, 0.10, 0.065, perf, "fp32",
                           ("measured on this host by hardware.cpu.measure_host",
                            "net: DESIGN.md loopback gRPC 0.65-0.9 GB/s", "price/power: assumptions"))


def cpu_profile(remeasure: bool = False) -> HardwareProfile:
    return profile_from(load_or_measure(remeasure))


if __name__ == "__main__":  # python -m hardware.cpu [--remeasure]: print (and cache) this host's figures
    import sys
    m = load_or_measure(remeasure="--remeasure" in sys.argv[1:])
    print(f"cache: {cache_path()}")
    for k, v in asdict(m).items():
        print(f"{k:18s} {v:.4g}" if isinstance(v, float) else f"{k:18s} {v}")
