"""Simulated workers: a prefill unit around the live PrefillBatcher, a decode unit around the live
Scheduler and BlockAllocator. Timing comes from hardware/perf.py; decisions from the policies.

Decode advances analytically: one `Scheduler.schedule()` per *segment* of k steps, during which
the batch cannot change (no finish before step k, enough free blocks for k more tokens per
sequence, segment cut short when a newcomer could be admitted). `fast_forward` applies the first
k-1 steps' bookkeeping exactly as k-1 schedule()/on_step_done() rounds would; the k-th step goes
through `on_step_done`, which detects finishes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from decode.allocator import BlockAllocator
from decode.scheduler import DecodeSeq, Scheduler, StepPlan
from hardware.perf import Deployment, Speculative, decode_step_time, inter_token_latency, prefill_time
from orchestrator.core.router import DecodeView, PrefillView
from prefill.batcher import PrefillBatcher, PrefillItem


@dataclass(slots=True)
class PrefillUnit:
    uid: str
    dep: Deployment
    batcher: PrefillBatcher
    tokens_per_s: float
    running_tokens: int = 0
    busy: bool = False
    busy_s: float = 0.0
    batches: int = 0
    batched_prompts: int = 0

    def view(self) -> PrefillView:
        return PrefillView(self.uid, self.batcher.queued_tokens + self.running_tokens, self.tokens_per_s)

    def start(self, slowdown: float = 1.0) -> tuple[list[PrefillItem], float]:
        """Take the next batch; returns it with its duration (empty batch: nothing waits).
        `slowdown`: factor while a decode unit shares the host (PerfParams.corun_slowdown_prefill)."""
        batch = self.batcher.next_batch()
        if not batch:
            return batch, 0.0
        dt = prefill_time(self.dep, [it.n_tokens for it in batch]) * slowdown
        self.busy, self.running_tokens = True, sum(it.n_tokens for it in batch)
        self.busy_s += dt
        self.batches += 1
        self.batched_prompts += len(batch)
        return batch, dt


@dataclass(slots=True)
class Segment:
    start: float
    plan: StepPlan
    batch: int
    ctx0: int  # total context of the batch at the first step
    steps: int
    step_s: float  # mean seconds per step over the segment
    version: int
    reserve_blocks: int = 0  # blocks the segment's sequences may still claim (kept free)


@dataclass(slots=True)
class DecodeUnit:
    uid: str
    dep: Deployment
    alloc: BlockAllocator
    sched: Scheduler
    spec: Speculative | None = None
    draft: Deployment | None = None
    seg: Segment | None = None
    version: int = 0
    pending: list = field(default_factory=list)  # handoffs waiting for KV blocks
    preempted: set = field(default_factory=set)  # request ids preempted and not yet re-admitted
    busy_s: float = 0.0
    steps: int = 0
    seq_steps: int = 0
    kv_used_s: float = 0.0  # integral of used-block fraction over time
    slowdown: float = 1.0  # step-time factor while a prefill shares the host (PerfParams.corun_slowdown_decode)

    def step_seconds(self, batch: int, ctx_sum: float) -> float:
        """Seconds per emitted token of each sequence (speculative decoding amortised)."""
        if self.spec is None:
            return decode_step_time(self.dep, batch, ctx_sum) * self.slowdown
        return inter_token_latency(self.dep, batch, max(1, int(ctx_sum / batch)), self.spec, self.draft) * self.slowdown

    def view(self) -> DecodeView:
        active = self.sched.n_running + self.sched.n_waiting + len(self.pending)
        ctx = sum(s.context_len for s in self.seg.plan.batch) if self.seg else 0
        step = self.step_seconds(active + 1, ctx + 1024) * 1e3
        free = self.alloc.free_blocks * self.alloc.block_size
        return DecodeView(self.uid, active, self.sched.max_batch, free, self.alloc.capacity_tokens, step)

    def begin(self, now: float) -> Segment | None:
        """Schedule a segment if idle with work: the policy picks the batch, we pick k."""
        if self.seg is not None or not self.sched.has_work:
            return None
        plan = self.sched.schedule()
        self.preempted.update(plan.preempted)
        self.preempted.difference_update(s.request_id for s in plan.recompute)
        if plan.empty:
            return None
        extra = sum(prefill_time(self.dep, [s.context_len]) for s in plan.recompute)
        b = len(plan.batch)
        ctx0 = sum(s.context_len for s in plan.batch)
        k = min(s.max_tokens - len(s.generated) for s in plan.batch)
        per_seq_blocks = self.alloc.free_blocks // b
        k = max(1, min(k, per_seq_blocks * self.alloc.block_size))
        step = self.step_seconds(b, ctx0 + b * (k - 1) / 2)
        self.version += 1
        reserve = b * -(-(k - 1) // self.alloc.block_size)
        self.seg = Segment(now + extra, plan, b, ctx0, k, step, self.version, reserve)
        return self.seg

    def can_take(self, n_tokens: int) -> bool:
        """Room for a new sequence's KV without eating the running segment's reserved blocks.

        No new KV is accepted while a preempted sequence waits to be re-admitted: the scheduler
        re-admits preempted sequences first (FIFO) and a WAITING sequence holds its blocks, so
        handoffs filling the pool then would starve the preempted one and, with nothing running,
        stall the unit for good (decode/scheduler.py has no way out of that state).
        """
        if self.preempted:
            return False
        reserve = self.seg.reserve_blocks if self.seg else 0
        return self.alloc.blocks_for(n_tokens) + reserve <= self.alloc.free_blocks

    def end_time(self) -> float:
        s = self.seg
        return s.start + s.steps * s.step_s

    def truncate(self, now: float, force: bool = False) -> bool:
        """Cut the running segment at the step boundary after `now` so a newcomer can join
        (`force`: also with a full batch, so a changed step rate takes effect)."""
        s = self.seg
        if s is None or (self.sched.n_running >= self.sched.max_batch and not force):
            return False
        done = int(max(0.0, now - s.start) / s.step_s) + 1
        if done >= s.steps:
            return False
        s.steps = done
        self.version += 1
        s.version = self.version
        return True

    def finish_segment(self):
        """Apply the segment's k steps; returns the scheduler's Finished list."""
        s = self.seg
        self.seg = None
        k = s.steps
        for seq in s.plan.batch:
            if k > 1:
                fast_forward(self.alloc, seq, k - 1)
        self.busy_s += k * s.step_s
        self.steps += k
        self.seq_steps += k * s.batch
        self.kv_used_s += k * s.step_s * self.alloc.used_blocks / self.alloc.n_blocks
        return self.sched.on_step_done([0] * s.batch)


def fast_forward(alloc: BlockAllocator, seq: DecodeSeq, n: int) -> None:
    """n decode steps of a running sequence without a finish or a preemption (checked by caller)."""
    ok = alloc.extend(seq.request_id, seq.context_len + n + 1)
    assert ok, "segment length must leave room for every sequence"
    seq.context_len += n
    seq.generated.extend([0] * n)
