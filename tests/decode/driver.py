"""Test harness: drive scheduler + pool + core in process, and judge outputs against greedy references."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from decode.core import DecodeCore, model_layout
from decode.pool import PagedKVPool
from decode.scheduler import DecodeSeq, Scheduler
from kvtransfer.sink import KVRefused
from model.finish import FinishReason
from model.generation import greedy_reference

REF_TOKENS = 16  # greedy reference length per prompt
TIE_FRACTION = 1e-4  # a divergence is accepted where the top-two margin < this x logit scale


@dataclass(slots=True)
class Reference:
    prompt: list[int]
    tokens: list[int]
    margins: list[float]
    scale: float  # max |logit| of the prompt's last position
    ks: list[np.ndarray]
    vs: list[np.ndarray]


class ReferenceBook:
    """Prefill and greedy reference of each prompt, computed once."""

    def __init__(self, lm, prompts: list[list[int]]):
        self.lm, self.prompts = lm, prompts
        self._refs: dict[int, Reference] = {}

    def __len__(self) -> int:
        return len(self.prompts)

    def get(self, i: int) -> Reference:
        if i not in self._refs:
            m, p = self.lm.model, self.prompts[i]
            logits, ks, vs = m.prefill(p)
            tokens, margins = greedy_reference(m, p, REF_TOKENS, self.lm.tokenizer.stop_token_ids)
            self._refs[i] = Reference(p, tokens, margins, float(np.abs(logits).max()), ks, vs)
        return self._refs[i]


@dataclass(slots=True)
class Join:
    prompt: int  # index into the book
    step: int  # scheduler step at which the KV arrives
    max_tokens: int
    abort_step: int | None = None


@dataclass(slots=True)
class Outcome:
    generated: dict[str, tuple[int, ...]] = field(default_factory=dict)
    reasons: dict[str, FinishReason] = field(default_factory=dict)
    refused: set[str] = field(default_factory=set)
    preemptions: int = 0
    max_batch_seen: int = 0


def run(lm, book: ReferenceBook, joins: list[Join], capacity_tokens: int = 4096, block_size: int = 16,
        max_batch: int = 16, max_steps: int = 400, threads: int | None = None) -> tuple[Outcome, PagedKVPool]:
    """Joins arrive at their step (refused when the pool is full); run until everything ends."""
    pool = PagedKVPool(model_layout(lm.model), block_size, capacity_tokens=capacity_tokens)
    sched, core = Scheduler(pool.allocator, max_batch), DecodeCore(lm.model, pool, threads=threads)
    stop_ids = lm.tokenizer.stop_token_ids
    out, prompts = Outcome(), {}
    for step in range(max_steps):
        for i, j in enumerate(joins):
            rid = f"s{i}"
            if j.step == step:
                ref = book.get(j.prompt)
                try:
                    pool.load_sequence(rid, ref.ks, ref.vs)
                except KVRefused as e:
                    assert e.code == "RESOURCE_EXHAUSTED" and not pool.allocator.holds(rid)
                    out.refused.add(rid)
                    continue
                prompts[rid] = ref.prompt
                done = sched.add(DecodeSeq(rid, pool.claim(rid), [ref.tokens[0]], j.max_tokens, stop_ids))
                if done is not None:
                    out.generated[rid], out.reasons[rid] = done.generated, done.reason
            if j.abort_step == step and sched.get(rid) is not None:
                done = sched.abort(rid)
                out.generated[rid], out.reasons[rid] = done.generated, done.reason
        if not sched.has_work and step > max(j.step for j in joins):
            break
        plan = sched.schedule()
        out.preemptions += len(plan.preempted)
        if plan.empty:
            continue
        out.max_batch_seen = max(out.max_batch_seen, len(plan.batch))
        for seq in plan.recompute:
            core.recompute(seq.request_id, prompts[seq.request_id] + seq.generated[:-1])
        rids = [s.request_id for s in plan.batch]
        batch = core.batch_input(rids, [s.next_token for s in plan.batch], [s.context_len for s in plan.batch])
        tokens = np.argmax(core.forward(batch), axis=1)
        for done in sched.on_step_done(tokens):
            out.generated[done.request_id], out.reasons[done.request_id] = done.generated, done.reason
        pool.allocator.check()
    assert not sched.has_work, "schedule did not drain"
    return out, pool


def judge(ours: tuple[int, ...], ref: Reference, complete: bool, max_tokens: int) -> tuple[bool, bool]:
    """(ok, tie): ours must equal the reference token by token, up to an accepted near-tie.

    complete: the sequence ended on its own, so its length must match too.
    """
    for i, (a, b) in enumerate(zip(ours, ref.tokens)):
        if a != b:
            return ref.margins[i] < TIE_FRACTION * ref.scale, True
    if not complete:
        return True, False  # aborted: any prefix of the reference is right
    expected = list(ref.tokens[:max_tokens])
    return len(ours) == len(expected) or len(ref.tokens) < max_tokens, False
