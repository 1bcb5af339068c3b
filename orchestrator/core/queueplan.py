"""A prefill worker's queue cut into batches exactly as prefill/batcher.py's PrefillBatcher would.

Pure. The batcher's rule, restated here because core may not import prefill/ (tests compare the
two on random queues): earliest deadline (arrival + TTFT target) first, then higher priority,
then arrival, ties first come first served (a stable sort of the queue in insertion order); a
batch takes prompts in that order while the count stays within `max_batch` and the total tokens
within `token_budget`; a prompt longer than the budget runs alone; nobody skips ahead. When the
batcher's order changes, change `order_key` with it.

A newcomer arriving at `now` goes after every queued prompt with an earlier (or equal) key; the
prediction assumes no later arrival overtakes it (a later, tighter deadline can: the "ttft"
correction absorbs what that costs). The batches before the one it lands in are the batches of
the queue without it (batching is greedy from the head), except that the batch it cannot join is
cut where it stands; `locate` finds that in O(log Q) plus its own batch, given a `QueuePlan` built
once per queue state.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from itertools import accumulate

from hardware.perf import Deployment, prefill_time


@dataclass(frozen=True, slots=True)
class QueuedPrompt:
    """One prompt waiting in a prefill worker's batcher."""

    n_tokens: int  # prompt tokens, >= 1
    arrival_s: float  # seconds, the epoch of `now`
    priority: int = 0  # higher runs first
    ttft_s: float = math.inf  # seconds, its TTFT target

    def __post_init__(self) -> None:
        if not isinstance(self.n_tokens, int) or self.n_tokens < 1:
            raise ValueError(f"n_tokens: must be an integer >= 1, got {self.n_tokens!r}")
        if not math.isfinite(self.arrival_s):
            raise ValueError(f"arrival_s: must be finite, got {self.arrival_s!r}")


def order_key(priority: int, arrival_s: float, ttft_s: float = math.inf) -> tuple[float, int, float]:
    """The batcher's sort key (prefill/batcher.py `_order`): deadline, then priority, then arrival."""
    return (arrival_s + ttft_s, -priority, arrival_s)


@dataclass(frozen=True, slots=True)
class QueuePlan:
    """The queue in run order, cut into batches, each timed by the perf model (uncorrected)."""

    order: tuple[int, ...]  # queue indices (input order) in run order
    keys: tuple[tuple[float, int, float], ...]  # order_key of each prompt, run order (ascending)
    lengths: tuple[int, ...]  # tokens of each prompt, run order
    batch_of: tuple[int, ...]  # batch index of each prompt, run order
    starts: tuple[int, ...]  # run-order position where each batch starts
    ends_s: tuple[float, ...]  # seconds, cumulative perf-model time to the end of each batch
    times: tuple[float, ...] = ()  # seconds, perf-model time of each batch (ends_s accumulates them)

    @property
    def batches(self) -> tuple[tuple[int, ...], ...]:
        """Queue indices of each batch, in run order (what successive next_batch() calls return)."""
        bounds = self.starts + (len(self.order),)
        return tuple(self.order[bounds[b]:bounds[b + 1]] for b in range(len(self.starts)))


def _greedy(lengths: list[int], token_budget: int, max_batch: int) -> list[int]:
    """Start position of each batch under the batcher's rule."""
    starts, count, tokens = [], 0, 0
    for i, n in enumerate(lengths):
        if not starts or count == max_batch or tokens + n > token_budget:
            starts.append(i)
            count, tokens = 0, 0
        count += 1
        tokens += n
    return starts


def plan_queue(dep: Deployment, queue: tuple[QueuedPrompt, ...], token_budget: int, max_batch: int,
               slowdown: float = 1.0) -> QueuePlan:
    """Batches of `queue` (in insertion order) with their perf-model durations times `slowdown`."""
    order = sorted(range(len(queue)), key=lambda i: order_key(queue[i].priority, queue[i].arrival_s, queue[i].ttft_s))
    lengths = [queue[i].n_tokens for i in order]
    starts = _greedy(lengths, token_budget, max_batch)
    bounds = starts + [len(order)]
    batch_of = [b for b in range(len(starts)) for _ in range(bounds[b], bounds[b + 1])]
    times = tuple(prefill_time(dep, lengths[bounds[b]:bounds[b + 1]]) * slowdown for b in range(len(starts)))
    keys = tuple(order_key(queue[i].priority, queue[i].arrival_s, queue[i].ttft_s) for i in order)
    return QueuePlan(tuple(order), keys,
                     tuple(lengths), tuple(batch_of), tuple(starts), tuple(accumulate(times)), times)


def _keeps_order(plan: QueuePlan) -> bool:
    """The queue was given in run order (the simulator passes the batcher's), so run order = queue order."""
    return plan.order == tuple(range(len(plan.order)))


def append_last(plan: QueuePlan, dep: Deployment, q: QueuedPrompt, token_budget: int, max_batch: int,
                slowdown: float = 1.0) -> QueuePlan | None:
    """What plan_queue returns once `q` joins the end of the queue it planned, in O(1) Python work
    (the tuples are copied): None when `q` would not run last (its key sorts before the last one), or
    the plan does not keep the queue's order; then plan the queue again."""
    n, key = len(plan.order), order_key(q.priority, q.arrival_s, q.ttft_s)
    if n and (key < plan.keys[-1] or not _keeps_order(plan)):
        return None
    starts, times = plan.starts, plan.times
    last = starts[-1] if starts else 0
    lengths = plan.lengths + (q.n_tokens,)
    if starts and n - last < max_batch and sum(plan.lengths[last:]) + q.n_tokens <= token_budget:
        times = times[:-1] + (prefill_time(dep, lengths[last:]) * slowdown,)
        ends = plan.ends_s[:-1] + ((plan.ends_s[-2] if len(starts) > 1 else 0.0) + times[-1],)
        batch_of = plan.batch_of + (len(starts) - 1,)
    else:
        times = times + (prefill_time(dep, [q.n_tokens]) * slowdown,)
        ends = plan.ends_s + ((plan.ends_s[-1] if starts else 0.0) + times[-1],)
        batch_of, starts = plan.batch_of + (len(starts),), starts + (n,)
    return QueuePlan(plan.order + (n,), plan.keys + (key,), lengths, batch_of, starts, ends, times)


def drop_first_batch(plan: QueuePlan, taken: int) -> QueuePlan | None:
    """What plan_queue returns once the `taken` prompts at the head of the queue have left it as a
    batch: None unless they are the plan's first batch and the plan keeps the queue's order (then plan
    the queue again)."""
    n = len(plan.order)
    k = plan.starts[1] if len(plan.starts) > 1 else n
    if not plan.starts or k != taken or not _keeps_order(plan):
        return None
    times = plan.times[1:]
    return QueuePlan(tuple(range(n - k)), plan.keys[k:], plan.lengths[k:], tuple(b - 1 for b in plan.batch_of[k:]),
                     tuple(x - k for x in plan.starts[1:]), tuple(accumulate(times)), times)


@dataclass(slots=True)  # not frozen, for speed: see predictor.Estimate
class Slot:
    """Where a newcomer lands: its batch and the perf-model time before that batch starts."""

    batch: int  # index of its batch in run order (0: the next batch to start)
    before_s: float  # seconds of perf-model compute before its batch (the batch in progress excluded)
    lengths: tuple[int, ...]  # prompt tokens of its batch, its own first
    members: tuple[int, ...]  # queue indices (input order) of the others in its batch


def locate(plan: QueuePlan, dep: Deployment, n_tokens: int, priority: int, now: float, token_budget: int,
           max_batch: int, slowdown: float = 1.0, ttft_s: float = math.inf) -> Slot:
    """The newcomer's batch if it joined the batcher at `now` (no later arrival overtaking it)."""
    pos = bisect.bisect_right(plan.keys, order_key(priority, now, ttft_s))  # insort_right: after equal keys
    own, members, before, batch = [n_tokens], [], 0.0, 0
    if pos > 0:
        b = plan.batch_of[pos - 1]
        s = plan.starts[b]
        open_lengths = plan.lengths[s:pos]
        prior = plan.ends_s[b - 1] if b else 0.0
        if pos - s < max_batch and sum(open_lengths) + n_tokens <= token_budget:  # joins the open batch
            batch, before = b, prior
            own, members = [n_tokens, *open_lengths], list(plan.order[s:pos])
        else:  # the open batch closes in front of it (cut short if it had prompts behind)
            batch = b + 1
            whole = (plan.starts[b + 1] if b + 1 < len(plan.starts) else len(plan.order)) == pos
            before = plan.ends_s[b] if whole else prior + prefill_time(dep, open_lengths) * slowdown
    tokens = sum(own)
    for i in range(pos, len(plan.order)):  # prompts behind it that still fit its batch
        n = plan.lengths[i]
        if len(own) == max_batch or tokens + n > token_budget:
            break
        members.append(plan.order[i])
        own.append(n)
        tokens += n
    return Slot(batch, before, tuple(own), tuple(members))
