"""Per-pool numpy arrays of what the pruned pair search reads of every worker (issue 16, item 9).

Pure. A `PrefillIndex` / `DecodeIndex` is built once per snapshot of a pool's states (the Router
keeps the last one and rebuilds it when the views passed change), so a decision computes
every worker's lower bound in a few vector expressions instead of a Python step per worker. The
correction factors the bounds use are gathered per phase into vectors cached on
`Corrections.version`: rebuilt after an observation, not per decision.

`ascending` yields the candidates in (bound, position) order lazily: a search that stops after the
first few pays a partition of the pool, not a sort of it.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np

from hardware.perf import Deployment, prefill_time, token_step_time
from orchestrator.core.correction import Corrections, ttft_key
from orchestrator.core.predictor import DecodeState, PrefillState

_FULL_SORT = 64  # candidates up to which `ascending` sorts them all at once


def ascending(key: np.ndarray, first: int = 8) -> Iterator[np.ndarray]:
    """Positions of `key` [n] in ascending (key, position) order, in chunks sorted one at a time (the
    `first` smallest, then 4x more, ...) as far as the caller reads."""
    if len(key) <= max(first, _FULL_SORT):
        yield np.argsort(key, kind="stable")
        return
    rest = np.arange(len(key))  # [m] positions not yet yielded
    k = first
    while len(rest):
        if len(rest) > max(k, _FULL_SORT):
            sub = key[rest]
            t = np.partition(sub, k - 1)[k - 1]
            take = sub <= t  # every tie of the k-th smallest, so the position order within them holds
            head, rest = rest[take], rest[~take]
        else:
            head, rest = rest, rest[:0]
        yield head[np.argsort(key[head], kind="stable")]  # `head` ascending: ties stay in position order
        k *= 4


def _by_id(ids: list[str]) -> np.ndarray:
    """[n] int64: the positions in ascending id order (ties of a bound go to the lowest id)."""
    return np.array(sorted(range(len(ids)), key=ids.__getitem__), dtype=np.int64)


def _groups(deps: Sequence[Deployment]) -> tuple[list[Deployment], np.ndarray]:
    """The distinct deployments (by identity, first-seen order) and each worker's index into them [n]."""
    first: dict[int, int] = {}
    out: list[Deployment] = []
    of = np.empty(len(deps), dtype=np.int64)
    for i, dep in enumerate(deps):
        j = first.get(id(dep))
        if j is None:
            j = first[id(dep)] = len(out)
            out.append(dep)
        of[i] = j
    return out, of


class _Pool:
    """What both sides share: ids, their order (the tie-break), health and per-phase correction vectors."""

    def __init__(self, ids: list[str], healthy: Sequence[bool], deps: Sequence[Deployment]):
        self.ids = ids
        self.by_id = _by_id(ids)  # [n]
        self.healthy = np.array(healthy, dtype=bool)  # [n]
        self.deps, self.dep_of = _groups(deps)  # dep_of [n]
        self.path = np.array([d.hw.perf.request_path_s for d in deps])  # [n] seconds
        self.any_healthy = bool(self.healthy.any())
        self._alone: dict[int, np.ndarray] = {}
        self._memo: dict[object, object] = {}
        self._memo_of: tuple[Corrections | None, int] = (None, -1)  # the corrections and version gathered at

    def cached(self, corr: Corrections, key: object, make):
        """make(): a value derived from the corrections, kept under `key` until they change."""
        of, version = self._memo_of
        if corr is not of or corr.version != version:
            self._memo, self._memo_of = {}, (corr, corr.version)
        got = self._memo.get(key)
        if got is None:
            got = self._memo[key] = make()
        return got

    def alone(self, prompt_tokens: int) -> np.ndarray:
        """[deployments] perf-model seconds of prefilling the prompt alone on each distinct deployment."""
        got = self._alone.get(prompt_tokens)
        if got is None:
            if len(self._alone) >= 1024:
                self._alone.clear()
            got = self._alone[prompt_tokens] = np.array([prefill_time(dep, [prompt_tokens]) for dep in self.deps])
        return got

    def bound(self, corr: Corrections, phase: str) -> np.ndarray:
        """[n] the phase's bound factor on each worker."""
        return self.cached(corr, phase, lambda: np.array([corr.factors(w, phase).bound for w in self.ids]))

    def offset_bound(self, corr: Corrections, phase: str) -> np.ndarray:
        """[n] seconds, an additive phase's bound offset on each worker (Corrections.offsets)."""
        return self.cached(corr, ("offset", phase),
                           lambda: np.array([corr.offsets(w, phase).bound_s for w in self.ids]))

    def ttft_bound(self, corr: Corrections, ttft_s: float) -> np.ndarray:
        """[n] the "ttft" bound factor of each worker for a request of target `ttft_s` (its ttft_key class)."""
        bucket = 2.0 ** math.ceil(math.log2(ttft_s))
        return self.cached(corr, ("ttft", bucket),
                            lambda: np.array([corr.factors(ttft_key(w, ttft_s), "ttft").bound for w in self.ids]))

    def any_warm(self, corr: Corrections, phase: str) -> bool:
        """Corrections.warm(worker, phase) for some healthy worker."""
        return self.cached(corr, ("warm", phase), lambda: any(corr.warm(w, phase) for w, ok in
                                                               zip(self.ids, self.healthy.tolist()) if ok))


class PrefillIndex(_Pool):
    """A prefill pool's states as arrays; `views` is kept so the Router can tell when they change."""

    def __init__(self, views: Sequence, states: Sequence[PrefillState], healthy: Sequence[bool]):
        super().__init__([s.worker_id for s in states], healthy, [s.dep for s in states])
        self.views, self.states = tuple(views), tuple(states)
        self.busy_until = np.array([s.busy_until_s for s in states])  # [P] seconds
        self.measured = np.array([d.hw.perf.measured is not None for d in self.deps], dtype=bool)  # [deployments]
        self.slowdown = np.array([s.slowdown for s in states])  # [P]
        setups: dict[tuple[int, float], int] = {}
        self.setups: list[tuple[int, float]] = []  # distinct (index into deps, slowdown)
        self.setup_of = np.empty(len(states), dtype=np.int64)  # [P]
        deadline, owner, before, base, row_of = [], [], [], [], []
        for i, s in enumerate(states):
            j = setups.get((id(s.dep), s.slowdown))
            if j is None:
                j = setups[(id(s.dep), s.slowdown)] = len(self.setups)
                self.setups.append((int(self.dep_of[i]), s.slowdown))
            self.setup_of[i] = j
            plan = s.plan
            deadline += [k[0] for k in plan.keys]
            owner += [i] * len(plan.keys)
            base.append(len(before))
            # perf-model seconds before the batch a newcomer lands in, behind the first k prompts (run order)
            before += [0.0] + [plan.ends_s[b - 1] if b else 0.0 for b in plan.batch_of]
            row_of += [i] * (len(plan.keys) + 1)
        by_deadline = np.argsort(np.array(deadline, dtype=float), kind="stable")
        self.q_deadline = np.array(deadline, dtype=float)[by_deadline]  # [N] every queued prompt's deadline, ascending
        self.q_owner = np.array(owner, dtype=np.int64)[by_deadline]  # [N] its worker
        self.before_at = np.array(before, dtype=float)  # [N + P] seconds, see above
        self.base = np.array(base, dtype=np.int64)  # [P] worker's first row in before_at
        self.row_of = np.array(row_of, dtype=np.int64)  # [N + P] each before_at row's worker

    def probe(self, corr: Corrections) -> tuple[int, int, float, float, float] | None:
        """A healthy worker with the least prefill and transfer bound factors, the one the router's TTFT
        floor tries first: (position, its setup, prefill bound, transfer bound, request path) as Python
        numbers (None: no healthy worker)."""
        def make() -> tuple[int, int, float, float, float] | None:
            if not self.any_healthy:
                return None
            bp, bt = self.bound(corr, "prefill"), self.bound(corr, "transfer")
            i = int(np.where(self.healthy, bp + bt, math.inf).argmin())
            return i, int(self.setup_of[i]), float(bp[i]), float(bt[i]), float(self.path[i])

        return self.cached(corr, "probe", make)

    def before_rows(self, deadline_s: float) -> np.ndarray:
        """[P] each worker's row of `before_at`: perf-model seconds before a newcomer's batch (QueuePlan),
        at most what `locate` finds for a newcomer of that deadline: it counts only the prompts of strictly
        earlier deadline ahead of it (they sort before it whatever the priority); batch ends grow with
        the prompts ahead."""
        earlier = int(self.q_deadline.searchsorted(deadline_s, "left"))  # prompts of deadline < deadline_s
        return self.base + np.bincount(self.q_owner[:earlier], minlength=len(self.ids))

    def floor_terms(self, corr: Corrections, ttft_s: float, after: bool,
                    slack: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The prefill floor's factors for a request of target `ttft_s` (its "ttft" class), each times
        `slack`: g [P] (the "ttft" bound factor), g x prefill bound at every `before_at` row [N + P],
        g x prefill bound x slowdown [P], g x request path [P], and the transfer's: g x transfer bound
        [P] when the first token follows the transfer (`after`), else the transfer bound alone."""
        bucket = 2.0 ** math.ceil(math.log2(ttft_s))

        def make():
            g = self.ttft_bound(corr, ttft_s) * slack
            gf = g * self.bound(corr, "prefill")
            bt = self.bound(corr, "transfer")
            return g, gf[self.row_of] * self.before_at, gf * self.slowdown, g * self.path, (g if after else slack) * bt

        return self.cached(corr, ("floor", bucket, after, slack), make)


class DecodeIndex(_Pool):
    """A decode pool's states as arrays; `views` is kept so the Router can tell when they change."""

    def __init__(self, views: Sequence, states: Sequence[DecodeState], healthy: Sequence[bool],
                 total_kv_tokens: Sequence[int]):
        super().__init__([s.worker_id for s in states], healthy, [s.dep for s in states])
        self.views, self.states = tuple(views), tuple(states)
        self.total_kv = np.array(total_kv_tokens, dtype=np.int64)  # [D] tokens
        self.least_total_kv = int(self.total_kv.min()) if len(states) else 0
        self.free_kv = np.array([s.free_kv_tokens for s in states], dtype=np.int64)  # [D] tokens
        self.step_now = np.array([s.step_now_s for s in states])  # [D] seconds
        # analytic: perf-model steps grow with batch and context (no measured tables, no explicit draft)
        self.analytic = np.array([s.spec is None and s.dep.hw.perf.measured is None for s in states], dtype=bool)
        alone = [token_step_time(dep, 1, 0.0) for dep in self.deps]  # one sequence at no context
        self.step_floor = np.array([_step_floor(s, alone[j]) for s, j in zip(states, self.dep_of.tolist())])  # [D]


def _step_floor(st: DecodeState, alone_s: float) -> float:
    """Seconds, no more than any step a newcomer gets on `st` (analytic profiles: steps grow with batch
    and context): one sequence at no context, or the step in flight when the newcomer shares every
    step with all of them (none finishing or arriving, a free slot: a larger batch, a larger context)."""
    one = alone_s * st.slowdown / (1.0 - st.stall_fraction)
    if not st.remaining and not st.incoming and st.batch < st.max_batch:
        return max(one, st.step_now_s)
    return one
