"""Continuous-batching decode scheduler: pure logic over a BlockAllocator (no clock, no I/O, no Ray).

Lifecycle of a sequence (its KV of `context_len` tokens already sits in allocator blocks):

    add() -> WAITING --schedule()--> RUNNING --on_step_done()--> FINISHED
                                        |  ^
                              preempt   v  | schedule() admits back, listed in plan.recompute
                                     PREEMPTED
    abort() from any live state -> FINISHED(ABORT); blocks are released at once, or after the
    step in flight when the sequence is part of it (its KV is being written).

One decode step feeds each running sequence's last token at position `context_len`, so before
a step every running sequence must own room for `context_len + 1` tokens; a plan of k steps
(`schedule(max_steps)`, the simulator's fast path) reserves `context_len + k`
(allocator.tokens_to_run). Over a multi-step plan the batch does not change: k is at most the
tokens any of its sequences may still generate, so none finishes by length before step k, and the
blocks for all k steps are reserved up front; on_steps_done() applies the j <= k steps that ran
(a stop token ends its sequence there). Live decoding plans one step at a time.

Preemption policy (recompute, lowest class first, LIFO within a class): when a running sequence
cannot get a block for its next token, the most recently admitted running sequence of the lowest
priority is preempted (possibly the one asking), so a batch-class sequence gives up its blocks
before an interactive one does: its blocks are released and it joins the recompute queue, which
is ordered by priority (highest first), then by add() order. A schedule() call that preempted
admits nothing. Otherwise admission is FIFO, the recompute queue first: a preempted sequence is
re-admitted once `context_len + 1` tokens fit in the free blocks; its blocks are allocated here
and the caller must rebuild its KV (a prefill over the prompt and the tokens generated so far,
except the last, which is fed by the next step) before running the plan. A WAITING sequence already holds its blocks (handoff admission,
BlockAllocator.reserve, gave it room for its first step when its transfer opened), so it is
admissible whenever there is a batch slot, even while a preempted sequence does not fit (holding it
back could leave nothing running and nothing ever freed).
"""
from __future__ import annotations

import bisect
import enum
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

from decode.allocator import BlockAllocator, tokens_to_run
from model.finish import FinishReason


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass(slots=True)
class DecodeSeq:
    """One sequence on the decode side. `generated` starts with the first token (from prefill)."""

    request_id: str
    context_len: int  # tokens whose KV is stored (the prompt at first)
    generated: list[int]  # every sampled token id, stop token included
    max_tokens: int  # limit on len(generated)
    stop_token_ids: frozenset[int] = frozenset()
    priority: int = 0  # its SLA class's priority (higher: more important)
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: FinishReason | None = None
    n_preemptions: int = 0
    abort_pending: bool = field(default=False, repr=False)

    @property
    def next_token(self) -> int:
        return self.generated[-1]


@dataclass(slots=True)
class StepPlan:
    """What the next steps run. `batch` order is the row order of the step's tensors."""

    batch: list[DecodeSeq]
    recompute: list[DecodeSeq]  # admitted back after preemption: rebuild their KV first
    preempted: list[str]  # request ids that lost their blocks in this call
    steps: int = 1  # steps the batch may run unchanged; every sequence owns room for them

    @property
    def empty(self) -> bool:
        return not self.batch


@dataclass(frozen=True, slots=True)
class Finished:
    request_id: str
    reason: FinishReason
    generated: tuple[int, ...]


class Scheduler:
    """Decides which sequences run each step and applies each step's sampled tokens."""

    def __init__(self, allocator: BlockAllocator, max_batch: int):
        if max_batch < 1:
            raise ValueError(f"max_batch: must be >= 1, got {max_batch}")
        self.alloc = allocator
        self.max_batch = max_batch
        self._seqs: dict[str, DecodeSeq] = {}
        self._waiting: deque[DecodeSeq] = deque()
        self._preempted: list[DecodeSeq] = []  # recompute order: _recompute_key ascending
        self._running: list[DecodeSeq] = []  # admission order
        self._added = itertools.count()
        self._rank: dict[str, int] = {}  # request id -> add() order
        self._in_flight: StepPlan | None = None

    # -- views -----------------------------------------------------------------------------

    @property
    def n_running(self) -> int:
        return len(self._running)

    @property
    def n_waiting(self) -> int:
        return len(self._waiting) + len(self._preempted)

    @property
    def running_context_tokens(self) -> int:
        return sum(s.context_len for s in self._running)

    @property
    def context_tokens(self) -> int:
        """Stored context of every sequence running or waiting here (they will all share the steps)."""
        return self.running_context_tokens + sum(s.context_len for s in (*self._waiting, *self._preempted))

    def running_remaining(self) -> list[tuple[int, int]]:
        """(tokens it may still generate, context tokens it holds) of each running sequence, ascending:
        when batch slots and KV blocks free up."""
        return sorted((s.max_tokens - len(s.generated), s.context_len) for s in self._running)

    @property
    def has_work(self) -> bool:
        return bool(self._running or self._waiting or self._preempted)

    def get(self, request_id: str) -> DecodeSeq | None:
        return self._seqs.get(request_id)

    # -- inputs ----------------------------------------------------------------------------

    def add(self, seq: DecodeSeq) -> Finished | None:
        """Queue a sequence whose KV is in its blocks; it may finish at once on its first token."""
        if seq.request_id in self._seqs:
            raise ValueError(f"request_id: {seq.request_id!r} is already scheduled")
        if not self.alloc.holds(seq.request_id):
            raise ValueError(f"request_id: {seq.request_id!r} holds no KV blocks")
        if not seq.generated or seq.max_tokens < 1:
            raise ValueError("generated: must start with the first token; max_tokens >= 1")
        if seq.context_len + seq.max_tokens - 1 > self.alloc.capacity_tokens:
            raise ValueError(f"max_tokens: {seq.context_len} + {seq.max_tokens} tokens can never fit "
                             f"the pool of {self.alloc.capacity_tokens}")
        self._seqs[seq.request_id] = seq
        self._rank[seq.request_id] = next(self._added)
        seq.status = SeqStatus.WAITING
        reason = self._finish_reason(seq)
        if reason is not None:
            return self._finish(seq, reason)
        self._waiting.append(seq)
        return None

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> Finished | None:
        """End a live sequence (abort, or a stop string the caller found) and release its blocks.

        None if unknown or already finished, or when it is in the step in flight: then it ends in
        on_step_done() (its KV is being written), which drops that step's token.
        """
        seq = self._seqs.get(request_id)
        if seq is None or seq.status is SeqStatus.FINISHED:
            return None
        if self._in_flight is not None and seq in self._in_flight.batch:
            seq.abort_pending = True
            seq.finish_reason = reason
            return None
        if seq.status is SeqStatus.WAITING:
            self._waiting.remove(seq)
        elif seq.status is SeqStatus.PREEMPTED:
            self._preempted.remove(seq)
        else:
            self._running.remove(seq)
        return self._finish(seq, reason)

    # -- the step ----------------------------------------------------------------------------

    def schedule(self, max_steps: int = 1) -> StepPlan:
        """Reserve room for every running sequence's next token, preempting if needed; admit more.

        With max_steps > 1, plan up to that many steps of the same batch (plan.steps), bounded by
        the tokens left to any sequence and by the free blocks, and reserve their room too.
        """
        assert self._in_flight is None, "schedule() called twice without on_step_done()"
        if max_steps < 1:
            raise ValueError(f"max_steps: must be >= 1, got {max_steps}")
        plan = StepPlan(batch=[], recompute=[], preempted=[])
        i = 0
        while i < len(self._running):
            seq = self._running[i]
            if self.alloc.extend(seq.request_id, tokens_to_run(seq.context_len)):
                i += 1
                continue
            low = min(q.priority for q in self._running)  # the lowest class, its latest admitted
            at = max(j for j, q in enumerate(self._running) if q.priority == low)
            victim = self._running.pop(at)
            if at < i:
                i -= 1  # it already had its room: the sequence at i moved down one place
            self.alloc.release(victim.request_id)
            victim.status = SeqStatus.PREEMPTED
            victim.n_preemptions += 1
            plan.preempted.append(victim.request_id)
            bisect.insort(self._preempted, victim, key=self._recompute_key)
        if not plan.preempted:
            self._admit(plan)
        plan.batch = list(self._running)
        if plan.batch:
            self._in_flight = plan
            if max_steps > 1:
                self._reserve_steps(plan, max_steps)
        return plan

    def _reserve_steps(self, plan: StepPlan, max_steps: int) -> None:
        """Lengthen the plan to k steps and give every sequence room for them. Always fits: each
        sequence needs at most ceil((k - 1) / block_size) blocks more, and k <= its even share of
        the free blocks times block_size."""
        b, bs = len(plan.batch), self.alloc.block_size
        left = min(s.max_tokens - len(s.generated) for s in plan.batch)
        k = max(1, min(max_steps, left, self.alloc.free_blocks // b * bs))
        for seq in plan.batch:
            ok = self.alloc.extend(seq.request_id, tokens_to_run(seq.context_len, k))
            assert ok, "a multi-step plan must leave room for every sequence"
        plan.steps = k

    def _recompute_key(self, seq: DecodeSeq) -> tuple[int, int]:
        return (-seq.priority, self._rank[seq.request_id])

    def _admit(self, plan: StepPlan) -> None:
        while self._preempted and len(self._running) < self.max_batch:
            seq = self._preempted[0]
            if not self.alloc.can_allocate(tokens_to_run(seq.context_len)):
                break  # no later preempted sequence overtakes it; waiting ones may (see below)
            self._preempted.pop(0)
            self.alloc.allocate(seq.request_id, tokens_to_run(seq.context_len))
            seq.status = SeqStatus.RUNNING
            self._running.append(seq)
            plan.recompute.append(seq)
        # WAITING sequences already hold their blocks (reserved at handoff open), so admitting
        # them costs no free block; holding them back behind a preempted sequence that does not fit
        # could leave nothing running and nothing ever freed (a deadlock).
        while self._waiting and len(self._running) < self.max_batch:
            seq = self._waiting[0]
            if not self.alloc.extend(seq.request_id, tokens_to_run(seq.context_len)):
                return
            self._waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self._running.append(seq)

    def on_step_done(self, token_ids: Sequence[int]) -> list[Finished]:
        """Apply the tokens sampled for the in-flight plan's batch (same order). Returns finishes."""
        return self.on_steps_done([(t,) for t in token_ids])

    def on_steps_done(self, tokens: Sequence[Sequence[int]]) -> list[Finished]:
        """Apply j <= plan.steps steps: tokens[i] holds the j tokens sampled for batch row i, in
        order (a plan may be cut short). A sequence that finishes drops the tokens after its finish."""
        plan = self._in_flight
        assert plan is not None, "on_step_done() without a scheduled step"
        assert len(tokens) == len(plan.batch), "tokens for every sequence of the batch"
        j = len(tokens[0]) if tokens else 0
        assert 1 <= j <= plan.steps and all(len(t) == j for t in tokens), "1..plan.steps tokens per sequence"
        self._in_flight = None
        done = []
        for seq, toks in zip(plan.batch, tokens):
            if seq.abort_pending:
                seq.context_len += j  # the fed tokens' KV is stored; the sampled ones are dropped
                self._running.remove(seq)
                done.append(self._finish(seq, seq.finish_reason or FinishReason.ABORT))
                continue
            take = j  # j <= plan.steps <= the tokens left to any sequence of the batch
            if seq.stop_token_ids:
                take = next((n + 1 for n, t in enumerate(toks[:take]) if t in seq.stop_token_ids), take)
            seq.context_len += take  # the fed tokens' KV is now stored
            seq.generated.extend(int(t) for t in toks[:take])
            reason = self._finish_reason(seq)
            if reason is not None:
                self._running.remove(seq)
                done.append(self._finish(seq, reason))
        return done

    # -- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _finish_reason(seq: DecodeSeq) -> FinishReason | None:
        if seq.generated[-1] in seq.stop_token_ids:
            return FinishReason.STOP
        if len(seq.generated) >= seq.max_tokens:
            return FinishReason.LENGTH
        return None

    def _finish(self, seq: DecodeSeq, reason: FinishReason) -> Finished:
        self.alloc.release(seq.request_id)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        del self._seqs[seq.request_id]
        del self._rank[seq.request_id]
        return Finished(seq.request_id, reason, tuple(seq.generated))
