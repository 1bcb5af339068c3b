"""Simulated workers: a prefill unit around the live PrefillBatcher, a decode unit around the live
Scheduler and BlockAllocator. Timing comes from hardware/perf.py; decisions from the policies.

Decode advances analytically: one `Scheduler.schedule(max_steps)` per *segment* of k steps, during
which the batch cannot change (the scheduler bounds k by the tokens left and the free blocks, and
reserves the blocks); a segment is cut short when a newcomer could be admitted, and
`Scheduler.on_steps_done` applies the steps that ran.

Handoff admission is the live rule, BlockAllocator.reserve, at the same point: when the prefill
batch starts (prefill/worker.py opens its transfers then). Live fails a refused handoff with
RESOURCE_EXHAUSTED; the simulator counts it (`refusals`) and retries it, in arrival order, as
blocks are freed.

Local prefill (conditional disaggregation), as live DecodeWorker.prefill_local: the request's blocks
are reserved when it is placed, its prefill runs on the unit between two segments (a running
segment is cut at the next step), one prompt at a time in placement order, and the sequence joins
the scheduler when it ends. With `chunk_tokens` (chunked local prefill) the prompt at the head
instead rides the steps while sequences decode, that many tokens a step (each step takes
perf.chunk_step_time longer), in segments that end when it is done; with none decoding it runs
whole.
"""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from decode.allocator import BlockAllocator
from decode.scheduler import Scheduler, StepPlan
from hardware.perf import Deployment, Speculative, chunk_step_time, prefill_time, token_step_time
from orchestrator.core.arrivals import ArrivalMeter, DecodeArrivals, per_token_s
from orchestrator.core.predictor import DecodeState, PrefillState, fewest_steps, incoming_at
from orchestrator.core.queueplan import QueuedPrompt, QueuePlan, append_last, drop_first_batch, plan_queue
from orchestrator.core.stall import StallMeter
from orchestrator.core.router import DecodeView, PrefillView
from prefill.batcher import PrefillBatcher, PrefillItem


SEGMENT_STEPS = 1 << 30  # no bound of the simulator's own: the scheduler's (tokens left, free blocks)


@dataclass(slots=True)
class PrefillUnit:
    index: int  # position in Simulator.prefill; the router sees `uid`
    dep: Deployment
    batcher: PrefillBatcher
    running_tokens: int = 0
    busy: bool = False
    busy_until: float = 0.0  # seconds: end of the batch in progress
    busy_s: float = 0.0
    batches: int = 0
    batched_prompts: int = 0
    _view: PrefillView | None = None  # cached until the queue or the batch in progress changes
    # the batcher's queue as the predictor sees it, in run order, and its plan (None: plan it again), kept
    # up to date as prompts join at the end and batches leave the head: a view costs O(1), not O(queue)
    _queue: list[QueuedPrompt] = field(default_factory=list)
    _plan: QueuePlan | None = None
    arrivals: ArrivalMeter = field(init=False)  # prefill work placed here lately, by target
    _now: float = 0.0  # the last time its queue changed: its view's arrivals are as of then

    def __post_init__(self) -> None:
        self.arrivals = ArrivalMeter(per_token_s(self.dep, self.batcher.token_budget))

    @property
    def uid(self) -> str:
        return f"p{self.index}"

    def add(self, item: PrefillItem) -> None:
        self.batcher.add(item)
        q, b = _queued(item), self.batcher
        self._now = item.arrival_s
        self.arrivals.add(item.arrival_s, item.ttft_s, item.n_tokens)
        self._plan = self._plan and append_last(self._plan, self.dep, q, b.token_budget, b.max_batch)
        if self._plan is not None:
            self._queue.append(q)
        else:  # it sorts before someone waiting: the queue again from the batcher
            self._queue = [_queued(it) for it in b.waiting]
        self._view = None

    def view(self) -> PrefillView:
        """The router's view: the predictor's state of this unit (it does not depend on the time)."""
        if self._view is None:
            b = self.batcher
            if self._plan is None:
                self._plan = plan_queue(self.dep, tuple(self._queue), b.token_budget, b.max_batch)
            st = PrefillState(self.uid, self.dep, b.token_budget, b.max_batch, tuple(self._queue),
                              self.busy_until if self.busy else 0.0, arrivals=self.arrivals.loads(self._now),
                              plan=self._plan)
            self._view = PrefillView(st, self.running_tokens)
        return self._view

    def start(self, now: float, slowdown: float = 1.0) -> tuple[list[PrefillItem], float]:
        """Take the next batch at `now`; returns it with its duration (empty batch: nothing waits).
        `slowdown`: factor while a decode unit shares the host (PerfParams.corun_slowdown_prefill)."""
        batch = self.batcher.next_batch()
        if not batch:
            return batch, 0.0
        del self._queue[:len(batch)]  # the batcher takes from the head of its run order
        self._plan = self._plan and drop_first_batch(self._plan, len(batch))
        dt = prefill_time(self.dep, [it.n_tokens for it in batch]) * slowdown
        self.busy, self.running_tokens, self.busy_until = True, sum(it.n_tokens for it in batch), now + dt
        self._view = None
        self.busy_s += dt
        self.batches += 1
        self.batched_prompts += len(batch)
        return batch, dt

    def done(self) -> None:
        """The batch in progress ended."""
        self.busy, self.running_tokens = False, 0
        self._view = None


def _queued(item: PrefillItem) -> QueuedPrompt:
    """A batcher's prompt as the predictor sees it."""
    return QueuedPrompt(item.n_tokens, item.arrival_s, item.priority, item.ttft_s)


@dataclass(slots=True)
class Segment:
    start: float
    plan: StepPlan
    batch: int
    ctx0: int  # total context of the batch at the first step
    steps: int
    step_s: float  # mean seconds per step over the segment
    version: int
    chunk_s: float = 0.0  # seconds of each step spent on a local prefill's chunk (0: none rides it)


@dataclass(frozen=True, slots=True)
class Handoff:
    """A request's KV on its way to a decode unit (request index into the run's requests)."""

    request: int
    n_tokens: int


@dataclass(slots=True)
class DecodeUnit:
    index: int  # position in Simulator.decode; the router sees `uid`
    dep: Deployment
    alloc: BlockAllocator
    sched: Scheduler
    spec: Speculative | None = None
    draft: Deployment | None = None
    seg: Segment | None = None
    version: int = 0
    refused: deque[Handoff] = field(default_factory=deque)  # refused at open, retried in order
    refusals: int = 0  # handoffs refused at open (live would fail them)
    preemptions: int = 0
    busy_s: float = 0.0
    steps: int = 0
    seq_steps: int = 0
    kv_used_s: float = 0.0  # integral of used-block fraction over time
    _running_local_s: float = 0.0  # seconds of the local prefill in progress
    slowdown: float = 1.0  # step-time factor while a prefill shares the host (PerfParams.corun_slowdown_decode)
    # requests placed here whose sequence is not in the scheduler yet (prefill, transfer): request ->
    # (predicted KV arrival, seconds; KV tokens its handoff will reserve at open: prompt + 1, 0 once
    # open; steps it will run; prompt + output tokens it holds at the end)
    incoming: dict[int, tuple[float, int, int, int]] = field(default_factory=dict)
    incoming_tokens: int = 0  # their prompt tokens
    tpot_targets: Counter = field(default_factory=Counter)  # (TPOT target seconds, steps) -> sequences here or
    # incoming with it
    local: deque[tuple[int, int]] = field(default_factory=deque)  # (request, prompt tokens) to prefill here
    prefilling_until: float | None = None  # seconds: end of the local prefill in progress (None: none)
    local_busy_s: float = 0.0  # perf-model seconds of the local prefills queued or running here
    chunk_tokens: int = 0  # prompt tokens of a local prefill per step it rides (0: whole, between segments)
    local_tokens: int = 0  # prompt tokens of the local prefills here not yet prefilled
    head_done: int = 0  # tokens of the first local prefill already prefilled by chunks
    stalls: StallMeter = field(default_factory=lambda: StallMeter(start_s=0.0))  # the simulated clock starts at 0
    arrivals: DecodeArrivals = field(default_factory=DecodeArrivals)  # sequences placed here lately
    local_prefills: int = 0

    @property
    def uid(self) -> str:
        return f"d{self.index}"

    def step_seconds(self, batch: int, ctx_sum: float) -> float:
        """Seconds per emitted token of each sequence (speculative decoding amortised), on a shared host slowed."""
        return token_step_time(self.dep, batch, ctx_sum, self.spec, self.draft) * self.slowdown

    def view(self, now: float) -> DecodeView:
        """The router's view at `now`: every sequence that will share the steps, with its context now."""
        sched, s = self.sched, self.seg
        ctx = sched.context_tokens + self.incoming_tokens
        done = 0  # the segment's steps so far are applied only at its end
        if s is not None:
            done = min(s.steps, max(0, int((now - s.start) / s.step_s)))
            ctx += s.batch * done
        incoming = incoming_at(self.incoming.values(), now)
        remaining = tuple((max(0, r - done), c + done) for r, c in sched.running_remaining())
        # slowdown 1: the predictor's corrections learn the co-run slowdown from observed steps, as live
        busy = self.local_busy_s
        if self.prefilling_until is not None:  # the one in progress counts what it has left
            busy -= self._running_local_s - max(0.0, self.prefilling_until - now)
        chunked = done * self.chunk_tokens if s is not None and s.chunk_s else 0
        st = DecodeState(self.uid, self.dep, sched.n_running + sched.n_waiting + len(incoming), ctx, sched.max_batch,
                         self.alloc.free_blocks * self.alloc.block_size, fewest_steps(self.tpot_targets),
                         spec=self.spec, draft=self.draft,
                         remaining=remaining, incoming=incoming, local_busy_s=max(0.0, busy),
                         stall_fraction=self.stalls.fraction(now), chunk_tokens=self.chunk_tokens,
                         local_tokens=max(0, self.local_tokens - chunked), arriving=self.arrivals.rate(now))
        return DecodeView(st, self.alloc.capacity_tokens, self.alloc.block_size)

    def add_target(self, now: float, tpot_s: float, steps: int) -> None:
        """A sequence with that TPOT target and that many steps is placed here at `now`."""
        self.tpot_targets[(tpot_s, steps)] += 1
        self.arrivals.add(now, steps)

    def drop_target(self, tpot_s: float, steps: int) -> None:
        """That sequence is done here."""
        key = (tpot_s, steps)
        self.tpot_targets[key] -= 1
        if not self.tpot_targets[key]:
            del self.tpot_targets[key]

    def add_local(self, request: int, prompt_tokens: int) -> None:
        """Queue a local prefill; its blocks are reserved now (the router saw room for them)."""
        ok = self.alloc.reserve(str(request), prompt_tokens + 1)
        assert ok, "the router places a local prefill only where its KV fits now"
        self.local.append((request, prompt_tokens))
        self.local_busy_s += prefill_time(self.dep, [prompt_tokens])
        self.local_tokens += prompt_tokens

    def begin_local(self, now: float) -> tuple[int, float] | None:
        """Start the next local prefill if no segment or prefill runs: (request, seconds)."""
        if self.seg is not None or self.prefilling_until is not None or not self.local:
            return None
        request, n = self.local[0]
        dt = prefill_time(self.dep, [n - self.head_done])  # what chunks left of it, whole
        self.prefilling_until, self._running_local_s = now + dt, dt
        return request, dt

    def end_local(self, now: float) -> None:
        """The local prefill in progress ended at `now`."""
        dt = self._running_local_s
        self.prefilling_until = None
        self.stalls.add(now, dt)
        self.busy_s += dt
        self._pop_local()

    def _pop_local(self) -> int:
        """The first local prefill is done: its request."""
        request, n = self.local.popleft()
        self.local_busy_s = max(0.0, self.local_busy_s - prefill_time(self.dep, [n]))
        self.local_tokens -= n - self.head_done
        self.head_done = 0
        self.local_prefills += 1
        return request

    def begin(self, now: float) -> Segment | None:
        """Schedule a segment if idle with work: the policy picks the batch, we pick k."""
        if self.seg is not None or self.prefilling_until is not None or not self.sched.has_work:
            return None
        chunk = bool(self.chunk_tokens and self.local)
        # a chunked local prefill rides the segment until it is done
        left = -(-(self.local[0][1] - self.head_done) // self.chunk_tokens) if chunk else SEGMENT_STEPS
        plan = self.sched.schedule(left)
        self.preemptions += len(plan.preempted)
        if plan.empty:
            return None
        extra = sum(prefill_time(self.dep, [s.context_len]) for s in plan.recompute)
        b, k = len(plan.batch), plan.steps
        ctx0 = sum(s.context_len for s in plan.batch)
        chunk_s = chunk_step_time(self.dep, self.chunk_tokens) * self.slowdown if chunk else 0.0
        step = self.step_seconds(b, ctx0 + b * (k - 1) / 2) + chunk_s
        self.version += 1
        self.seg = Segment(now + extra, plan, b, ctx0, k, step, self.version, chunk_s)
        return self.seg

    def open(self, h: Handoff) -> bool:
        """The live handoff admission (BlockAllocator.reserve); a refusal queues behind earlier ones."""
        if not self.refused and self.alloc.reserve(str(h.request), h.n_tokens):
            return True
        self.refused.append(h)
        self.refusals += 1
        return False

    def retry_refused(self) -> list[Handoff]:
        """Open refused handoffs, oldest first, while their blocks fit; returns those opened."""
        opened = []
        while self.refused and self.alloc.reserve(str(self.refused[0].request), self.refused[0].n_tokens):
            opened.append(self.refused.popleft())
        return opened

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

    def finish_segment(self, now: float) -> tuple[list, int | None]:
        """Apply the segment's k steps at its end `now`: the scheduler's Finished list, and the request
        whose chunked local prefill they completed (None: none)."""
        s = self.seg
        self.seg = None
        k = s.steps
        self.busy_s += k * s.step_s
        self.steps += k
        self.seq_steps += k * s.batch
        self.kv_used_s += k * s.step_s * self.alloc.used_blocks / self.alloc.n_blocks
        prefilled = None
        if s.chunk_s:
            self.stalls.add(now, k * s.chunk_s)
            ran = min(k * self.chunk_tokens, self.local[0][1] - self.head_done)
            self.head_done += ran
            self.local_tokens -= ran
            if self.head_done == self.local[0][1]:
                prefilled = self._pop_local()
        return self.sched.on_steps_done([(0,) * k] * s.batch), prefilled
