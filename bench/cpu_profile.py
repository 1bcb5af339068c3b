"""Measure this host for the `cpu` hardware profile (hardware/cpu.py holds the format, the cache and the profile).

    python -m bench.cpu_profile [--remeasure]    # print this host's figures, measuring them when not cached

What is measured, and why, is in hardware/cpu.py's docstring. This module runs the live engine's hot paths
(decode/core.py, the model), which is why it lives with the benches and not under hardware/.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict

import numpy as np

from hardware.cpu import (CpuMeasurement, DECODE_BATCHES, DECODE_REF_CTX, ENGINE_MODEL, MEASURE_BLAS_THREADS,
                          PREFILL_TOKENS, SLOPE_BATCHES, SLOPE_CTX, cache_path, fingerprint, load_cached, save)


def _best(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


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
        return CpuMeasurement(sgemm, bw, 30e-6, 0.5, 0.5, mem, False, fingerprint())
    return CpuMeasurement(sgemm, bw, mem_bytes=mem, engine_measured=True, fingerprint=fingerprint(), **engine)


def ensure_measured(remeasure: bool = False) -> CpuMeasurement:
    """This host's measurement: the cached one, or a new one (saying so, ~30 s) when absent or `remeasure`."""
    m = None if remeasure else load_cached()
    if m is None:
        print(f"measuring this host for the `cpu` profile (~30 s, once; cached in {cache_path()})", flush=True)
        m = measure_host()
        save(m)
    return m


if __name__ == "__main__":  # python -m bench.cpu_profile [--remeasure]
    import sys
    m = ensure_measured(remeasure="--remeasure" in sys.argv[1:])
    print(f"cache: {cache_path()}")
    for k, v in asdict(m).items():
        if isinstance(v, tuple):
            v = "(" + ", ".join(f"{x:.4g}" for x in v) + ")"
        print(f"{k:22s} {v:.4g}" if isinstance(v, float) else f"{k:22s} {v}")
