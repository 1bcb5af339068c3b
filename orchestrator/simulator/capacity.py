"""A deployment's request capacity under the performance model: the rate each pool can sustain.

Pure arithmetic on hardware/perf.py at a workload's mean lengths (no simulation):

- prefill: full batches of mean-length prompts (as many as the token budget and max_batch allow),
  back to back on every replica: replicas x prompts per batch / batch seconds;
- decode: as many sequences at once as the batch and the KV pool allow (prompt + output each), every
  step at the mean context: replicas x concurrent sequences / (output tokens x seconds per token).

The capacity is the smaller. It is an upper bound on sustainable throughput (a real queue needs
headroom for bursts), which is why rates are set as fractions of it: `make run` replays at about
0.6x this machine's capacity, the router-comparison experiment sweeps 0.5x to 2x.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from hardware.perf import kv_token_capacity, prefill_time, token_step_time
from orchestrator.simulator.engine import PoolSetup


@dataclass(frozen=True, slots=True)
class Capacity:
    prefill_rps: float  # requests/s the prefill pool sustains
    decode_rps: float  # requests/s the decode pool sustains
    mean_prompt: float  # tokens, the workload's means the figures are taken at
    mean_output: float

    @property
    def rps(self) -> float:
        return min(self.prefill_rps, self.decode_rps)

    @property
    def bottleneck(self) -> str:
        return "prefill" if self.prefill_rps <= self.decode_rps else "decode"

    def describe(self) -> str:
        return (f"predicted capacity {self.rps:.3g} req/s ({self.bottleneck}-bound: prefill {self.prefill_rps:.3g}, "
                f"decode {self.decode_rps:.3g} req/s at {self.mean_prompt:.0f} prompt + {self.mean_output:.0f} "
                f"output tokens)")


def capacity(prefill: PoolSetup, decode: PoolSetup, lengths: Sequence[tuple[int, int]],
             shared_host: bool = False) -> Capacity:
    """Capacity of the pools for requests of these (prompt, output) lengths; `shared_host`: the two
    pools share one host's cores, each slowed by the other (PerfParams.corun_slowdown_*)."""
    if not lengths:
        raise ValueError("lengths: need at least one (prompt, output) pair")
    prompt = sum(p for p, _ in lengths) / len(lengths)
    out = sum(o for _, o in lengths) / len(lengths)
    n = max(1, round(prompt))
    k = max(1, min(prefill.max_batch, prefill.token_budget // n))
    pf_s = prefill_time(prefill.dep, [n] * k)
    dep = decode.dep
    cap_tokens = decode.kv_capacity_tokens or kv_token_capacity(dep)
    c = max(1, min(decode.max_batch, int(cap_tokens // (prompt + out))))
    step_s = token_step_time(dep, c, c * (prompt + out / 2))
    if shared_host:
        pf_s *= prefill.dep.hw.perf.corun_slowdown_prefill
        step_s *= dep.hw.perf.corun_slowdown_decode
    return Capacity(prefill.replicas * k / pf_s, decode.replicas * c / (max(out - 1, 1.0) * step_s), prompt, out)
