"""Places a request on a (prefill worker, decode worker) pair, or rejects it early.

Pure policy: it reads only its arguments (pool views and the current time) and its own
round-robin cursor. Live frontends and the simulator both call `Router.place`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from orchestrator.core.sla import SLATarget


@dataclass(frozen=True, slots=True)
class RouteRequest:
    request_id: str
    prompt_tokens: int
    max_tokens: int
    sla: SLATarget


@dataclass(frozen=True, slots=True)
class PrefillView:
    """What the router knows about one prefill worker."""

    worker_id: str
    queued_tokens: int  # prompt tokens waiting or running on it
    tokens_per_s: float  # predicted prefill throughput
    healthy: bool = True

    def predicted_ttft_ms(self, prompt_tokens: int) -> float:
        return 1000.0 * (self.queued_tokens + prompt_tokens) / self.tokens_per_s


@dataclass(frozen=True, slots=True)
class DecodeView:
    """What the router knows about one decode worker."""

    worker_id: str
    active: int  # sequences admitted or waiting
    max_batch: int
    free_kv_tokens: int
    total_kv_tokens: int
    step_ms: float  # predicted decode step time with one more sequence
    healthy: bool = True

    @property
    def occupancy(self) -> float:
        return max(self.active / self.max_batch, 1.0 - self.free_kv_tokens / self.total_kv_tokens)


@dataclass(frozen=True, slots=True)
class Placement:
    prefill_worker: str
    decode_worker: str
    predicted_ttft_ms: float
    predicted_tpot_ms: float


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: str
    code: str = "RESOURCE_EXHAUSTED"  # gRPC status name


POLICIES = ("round_robin", "least_loaded", "sla")


class Router:
    def __init__(self, policy: str = "least_loaded"):
        if policy not in POLICIES:
            raise ValueError(f"policy: unknown router policy {policy!r}; choose one of {', '.join(POLICIES)}")
        self.policy = policy
        self._cursor = 0

    def place(self, req: RouteRequest, prefill: Sequence[PrefillView], decode: Sequence[DecodeView],
              now: float) -> Placement | Rejection:
        """Choose workers for `req` at time `now` (seconds, any epoch) given the pools' current views."""
        pf = [p for p in prefill if p.healthy]
        need = req.prompt_tokens + req.max_tokens
        dc = [d for d in decode if d.healthy and d.total_kv_tokens >= need]
        if not pf:
            return Rejection("no healthy prefill worker", code="UNAVAILABLE")
        if not dc:
            if any(d.healthy for d in decode):
                return Rejection(f"prompt + max_tokens = {need} tokens exceeds every decode worker's KV capacity")
            return Rejection("no healthy decode worker", code="UNAVAILABLE")
        if self.policy == "round_robin":
            p, d = pf[self._cursor % len(pf)], dc[self._cursor % len(dc)]
            self._cursor += 1
            return self._placement(req, p, d)
        if self.policy == "least_loaded":
            p = min(pf, key=lambda v: (v.predicted_ttft_ms(req.prompt_tokens), v.worker_id))
            d = min(dc, key=lambda v: (v.occupancy, -v.free_kv_tokens, v.worker_id))
            return self._placement(req, p, d)
        return self._place_by_sla(req, pf, dc)

    @staticmethod
    def _placement(req: RouteRequest, p: PrefillView, d: DecodeView) -> Placement:
        return Placement(p.worker_id, d.worker_id, p.predicted_ttft_ms(req.prompt_tokens), d.step_ms)

    def _place_by_sla(self, req: RouteRequest, pf: list[PrefillView], dc: list[DecodeView]) -> Placement | Rejection:
        """Meet both targets with the least loaded pair; reject early when no pair can."""
        p = min(pf, key=lambda v: (v.predicted_ttft_ms(req.prompt_tokens), v.worker_id))
        ttft = p.predicted_ttft_ms(req.prompt_tokens)
        if ttft > req.sla.ttft_ms:
            return Rejection(f"predicted TTFT {ttft:.0f} ms exceeds the target {req.sla.ttft_ms:.0f} ms")
        fitting = [d for d in dc if d.step_ms <= req.sla.tpot_ms and d.free_kv_tokens >= req.prompt_tokens + req.max_tokens
                   and d.active < d.max_batch]
        if not fitting:
            best = min(d.step_ms for d in dc)
            return Rejection(f"no decode worker has room within the TPOT target {req.sla.tpot_ms:.0f} ms "
                             f"(best predicted step {best:.1f} ms)")
        d = min(fitting, key=lambda v: (v.occupancy, v.worker_id))
        return self._placement(req, p, d)
