"""The `cpu` profile, measured on this host so the simulator can predict the live numpy system.

How it is measured (`measure_host`, about 25-30 s, once; cached as JSON in
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
   Ray: `python -m orchestrator.sim.serving`, cached as serving.json next to this cache, same
   fingerprint): the prefill worker's time beyond prefill_batch (KV send/commit, per request and
   per token), the frontend/Ray/gRPC latency added to TTFT, the per-token streaming overhead, and
   the co-run slowdowns of prefill and decode sharing the host's cores. See that module.

KV moves over loopback gRPC in the live system: 0.8 GB/s (DESIGN.md's measured figure) is assumed.
Price and power of the host are nominal assumptions ($0.10/h, 65 W).
Everything is measured with MEASURE_BLAS_THREADS BLAS threads: what each live worker actor gets
(cluster.yaml: pools.*.blas_threads), since prefill and decode actors share the host's cores.
`python -m hardware.cpu` prints the cached figures; `--remeasure` measures again (do it on a quiet
machine: other load inflates the timings). This VM's co-run behaviour varies over minutes (a tight
loop of prefill next to a decode loop measured 1.0x at one time and ~2x at another), so measure
close to the live runs being compared and note the load.
"""
from __future__ import annotations

import json
import os
import platform
import time
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


def _fingerprint() -> str:
    return (f"{platform.node()}|{platform.machine()}|{os.cpu_count()}|numpy {np.__version__}"
            f"|threads {MEASURE_BLAS_THREADS}|v{CACHE_VERSION}")


def cache_path() -> Path:
    base = Path(os.environ.get("PDO_CACHE_DIR", Path.home() / ".cache" / "pdorchestrator"))
    return base / "cpu_profile.json"


def serving_path() -> Path:
    """Serving overheads of the live stack (orchestrator/sim/serving.py writes it; optional)."""
    return cache_path().with_name("serving.json")


def load_serving(fingerprint: str) -> dict | None:
    """The measured serving overheads for this host, or None (absent, corrupt or another host)."""
    try:
        d = json.loads(serving_path().read_text())
    except (OSError, ValueError):
        return None
    return d if d.get("fingerprint") == fingerprint else None


def _best(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


# decode-step table (live decode max_batch is 64). Dense below 16: with the small-kernel row blocks
# (decode/projection.py) the step is not linear between powers of two (1 thread, context 128:
# B=3 71 ms vs 66 at B=4; B=5 80 ms vs 71 interpolated from 4 and 8; B=10 116 vs 99).
DECODE_BATCHES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 64)
DECODE_REF_CTX = 128  # cached tokens per sequence in the decode-step table
SLOPE_BATCHES = (1, 8, 32)  # batches re-measured at SLOPE_CTX for the per-token attention slope
SLOPE_CTX = 512
PREFILL_TOKENS = (16, 64, 128, 256, 512)  # one prefill_batch call (the bench's prompts are <= 512)
ENGINE_MODEL = "smollm2-135m"  # the live engine's model (model/specs.py name; DESIGN.md)


def _median(fn, reps: int) -> float:
    fn()  # warm-up (first touch of the pool, workspace allocation)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


class _Engine:
    """The live engine's hot paths as the workers run them: DecodeCore.forward + sample over a
    PagedKVPool (decode/worker.py) and Transformer.prefill_batch (prefill/worker.py)."""

    def __init__(self):
        from decode.core import DecodeCore, model_layout
        from decode.pool import PagedKVPool
        from model.loaded import load_model
        from model.sampling import SamplingParams

        self._core, self._pool, self._layout, self._params = DecodeCore, PagedKVPool, model_layout, SamplingParams
        lm = load_model()
        self.cfg, self.tr = lm.weights.config, lm.model
        self._kv: dict[int, tuple] = {}

    def decode_fn(self, batch: int, ctx: int):
        """A callable running one decode step of `batch` sequences at context `ctx` (rewrites position ctx)."""
        if ctx not in self._kv:
            self._kv[ctx] = self.tr.prefill(np.arange(1, ctx + 1) % self.cfg.vocab_size)[1:]
        ks, vs = self._kv[ctx]
        pool = self._pool(self._layout(self.tr), 64, capacity_tokens=batch * (ctx + 64))
        core = self._core(self.tr, pool, threads=MEASURE_BLAS_THREADS)
        rids = [f"s{i}" for i in range(batch)]
        for rid in rids:
            pool.load_sequence(rid, ks, vs)
        step = core.batch_input(rids, [5] * batch, [ctx] * batch)
        params, rngs = [self._params()] * batch, [None] * batch
        return lambda: core.sample(core.forward(step), params, rngs)

    def prefill_fn(self, n_tokens: int):
        prompt = list(np.arange(1, n_tokens + 1) % self.cfg.vocab_size)
        return lambda: self.tr.prefill_batch([prompt])


def _measure_engine(sgemm: float, bw: float) -> dict | None:
    """Engine figures (tables, co-run slowdowns, legacy analytic fit), or None without the model."""
    try:
        eng = _Engine()
    except Exception:
        return None
    from model.specs import get_spec
    spec, n_layers = get_spec(ENGINE_MODEL), eng.cfg.n_layers
    steps = [_median(eng.decode_fn(b, DECODE_REF_CTX), 3) for b in DECODE_BATCHES]
    slopes = []
    for b in SLOPE_BATCHES:
        longer = _median(eng.decode_fn(b, SLOPE_CTX), 3)
        slopes.append(max(0.0, (longer - steps[DECODE_BATCHES.index(b)]) / (b * (SLOPE_CTX - DECODE_REF_CTX))))
    eng._kv.clear()
    prefills = [_median(eng.prefill_fn(n), 3) for n in PREFILL_TOKENS]
    # legacy analytic coefficients (kept for reference and for other models on the cpu profile)
    t1, t16, tp = steps[0], steps[DECODE_BATCHES.index(16)], prefills[PREFILL_TOKENS.index(256)]
    memory = spec.active_weight_bytes("fp32") / bw
    layer_overhead = max(0.0, (t1 - memory) / n_layers)
    fixed = layer_overhead * n_layers
    decode_mfu = min(1.0, 16 * spec.decode_flops(DECODE_REF_CTX) / max(t16 - fixed, 1e-9) / sgemm)
    prefill_mfu = min(1.0, spec.prefill_flops(256) / max(tp - fixed, 1e-9) / sgemm)
    return dict(layer_overhead_s=layer_overhead, decode_mfu=decode_mfu, prefill_mfu=prefill_mfu,
                decode_step_s=tuple(steps), decode_ctx_slope_s=tuple(slopes), prefill_s=tuple(prefills))


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
    del big
    engine = _measure_engine(sgemm, bw)
    mem = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    if engine is None:
        return CpuMeasurement(sgemm, bw, 30e-6, 0.5, 0.5, mem, False, _fingerprint())
    return CpuMeasurement(sgemm, bw, mem_bytes=mem, engine_measured=True, fingerprint=_fingerprint(), **engine)


def load_or_measure(remeasure: bool = False) -> CpuMeasurement:
    """The cached measurement of this host, measuring (and caching) it when absent or stale."""
    path = cache_path()
    if not remeasure and path.exists():
        try:
            raw = json.loads(path.read_text())
            m = CpuMeasurement(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
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
                           ("measured on this host by hardware.cpu.measure_host",
                            "net: DESIGN.md loopback gRPC 0.65-0.9 GB/s", "price/power: assumptions"))


def cpu_profile(remeasure: bool = False) -> HardwareProfile:
    return profile_from(load_or_measure(remeasure))


if __name__ == "__main__":  # python -m hardware.cpu [--remeasure]: print (and cache) this host's figures
    import sys
    m = load_or_measure(remeasure="--remeasure" in sys.argv[1:])
    print(f"cache: {cache_path()}")
    for k, v in asdict(m).items():
        if isinstance(v, tuple):
            v = "(" + ", ".join(f"{x:.4g}" for x in v) + ")"
        print(f"{k:22s} {v:.4g}" if isinstance(v, float) else f"{k:22s} {v}")
