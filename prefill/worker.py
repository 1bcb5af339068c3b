"""PrefillWorker: batches prompts, runs the model, streams each layer's KV to a decode worker.

A plain class; pools wrap it as a Ray actor with the `neuron_cores` resource. Its methods are
async so one actor serves many concurrent requests: they queue in the pure PrefillBatcher, a
single loop runs batches in a worker thread (keeping the event loop free for load queries),
and each layer's K/V goes to the KV sender the moment the layer is computed, overlapping the
transfer with the remaining layers.
"""
from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import structlog

from kvtransfer.layout import KVLayout
from model.finish import Failure
from model.sampling import SamplingParams, make_rng, sample_one
from prefill.batcher import PrefillBatcher, PrefillItem

if TYPE_CHECKING:
    from model.loaded import LoadedModel

log = structlog.get_logger("prefill")


@dataclass(frozen=True, slots=True)
class PrefillJob:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    kv_target: str  # host:port of the decode worker's KV receiver
    deadline_s: float = 30.0  # for the KV transfer
    priority: int = 0
    ttft_s: float = math.inf  # seconds, its TTFT target: the batcher runs the earliest deadline first
    sampled_before: int = 0  # tokens an earlier attempt sampled (a migration: they end prompt_ids); their
    # random draws are skipped, so the first token here is the one the uninterrupted run would sample


@dataclass(frozen=True, slots=True)
class PrefillResult:
    """A prefilled prompt whose KV is committed on the decode side, or the Failure that stopped it."""

    request_id: str
    first_token: int = -1
    queued_ms: float = 0.0
    prefill_ms: float = 0.0
    transfer_tail_ms: float = 0.0  # transfer time left after the last layer was computed
    batch_lengths: tuple[int, ...] = ()  # prompt tokens of each prompt in its batch (the predictor's input)
    first_in_batch: bool = False  # the batch's first result: who reports the batch's time once
    error: Failure | None = None
    kv_failed: bool = False  # the error is the KV transfer's (the prefill itself ran): worth another try
    cpu_share: float = 1.0  # the batch thread's CPU time over its compute's wall time, in (0, 1]: the share of a
    # core it got (1: never descheduled; the rest it waited for a core other processes held). With blas_threads
    # > 1 BLAS's own threads are not counted, so it reads low

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True)
class PrefillLoad:
    worker_id: str
    queued_tokens: int  # prompt tokens waiting or running
    waiting: int  # prompts waiting
    running: tuple[str, ...] = ()  # request ids of the batch in progress
    running_lengths: tuple[int, ...] = ()  # their prompt tokens
    running_elapsed_s: float = 0.0  # seconds since that batch started


class PrefillWorker:
    def __init__(self, worker_id: str, token_budget: int = 4096, max_batch: int = 8, blas_threads: int = 1,
                 transfer_backend=None, model_path: str | None = None, loaded: LoadedModel | None = None):
        """`loaded`: a model already in this process (tests share one); else loaded from model_path."""
        from threadpoolctl import threadpool_limits

        from model.loaded import load_model

        threadpool_limits(blas_threads)
        self.worker_id = worker_id
        lm = loaded if loaded is not None else load_model(model_path)
        self.model = lm.model
        cfg = lm.weights.config
        self.layout = KVLayout(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, "float32")
        self.batcher = PrefillBatcher(token_budget, max_batch)
        self._jobs: dict[str, tuple[PrefillJob, asyncio.Future, float]] = {}
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._running: tuple[PrefillItem, ...] = ()
        self._running_since = 0.0  # perf_counter when the batch in progress started
        if transfer_backend is None:
            from kvtransfer.grpc_backend import GrpcTransferBackend

            transfer_backend = GrpcTransferBackend()
        self.transfer = transfer_backend

    # -- API -----------------------------------------------------------------------------

    async def prefill(self, job: PrefillJob) -> PrefillResult:
        """Queue a prompt; resolves once its KV is committed on the decode side (or failed)."""
        self._ensure_loop()
        fut = asyncio.get_running_loop().create_future()
        now = time.perf_counter()  # one clock for queue order and the queued_ms the request reports
        self._jobs[job.request_id] = (job, fut, now)
        self.batcher.add(PrefillItem(job.request_id, len(job.prompt_ids), now, job.priority, job.ttft_s))
        self._wakeup.set()
        return await fut

    async def abort(self, request_id: str) -> bool:
        """Drop a waiting prompt. A prompt already running finishes its batch, then its transfer aborts."""
        if self.batcher.remove(request_id):
            job, fut, _ = self._jobs.pop(request_id)
            fut.set_result(PrefillResult(request_id, error=Failure("CANCELLED", "aborted")))
            return True
        return False

    def load(self) -> PrefillLoad:
        running = self._running
        return PrefillLoad(self.worker_id, self.batcher.queued_tokens + sum(it.n_tokens for it in running),
                           len(self.batcher), tuple(it.request_id for it in running),
                           tuple(it.n_tokens for it in running),
                           time.perf_counter() - self._running_since if running else 0.0)

    def ready(self) -> bool:
        return True

    def inject_kv_fault(self, kind: str, count: int = 1) -> None:
        """The next `count` KV transfers opened here suffer `kind` (kvtransfer/faults.py): chaos only."""
        self.transfer.faults.arm(kind, count)

    def clear_kv_faults(self) -> int:
        """Disarm the injected KV faults no transfer has taken yet; returns how many."""
        return self.transfer.faults.clear()

    def kv_faults(self) -> tuple[list[tuple[str, str, float]], int]:
        """The injected KV faults that really hit a transfer, (kind, request id, unix time) each, and how
        many are still armed."""
        faults = self.transfer.faults
        return list(faults.hits), faults.armed

    async def close(self) -> None:
        """Stop the batch loop (a batch in its thread runs to its end); requests still queued get no result."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)

    # -- batch loop ----------------------------------------------------------------------

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while len(self.batcher):
                items = self.batcher.next_batch()
                batch = [self._jobs.pop(it.request_id) for it in items]
                self._running, self._running_since = tuple(items), time.perf_counter()
                try:
                    results = await asyncio.to_thread(self._run_batch, [(j, t) for j, _, t in batch])
                except Exception as e:  # a bug must not wedge the loop: fail this batch's requests
                    log.exception("prefill batch failed", worker=self.worker_id)
                    results = [PrefillResult(j.request_id, error=Failure("INTERNAL", str(e)))
                               for j, _, _ in batch]
                self._running = ()
                for (_, fut, _), res in zip(batch, results):
                    if not fut.done():
                        fut.set_result(res)

    def _run_batch(self, batch: list[tuple[PrefillJob, float]]) -> list[PrefillResult]:
        """Runs in a thread: prefill the batch, stream KV per layer, sample each first token. If that
        fails, the batch's transfers are aborted at once, releasing the KV both sides hold."""
        start = time.perf_counter()
        cpu_start = time.thread_time()  # this thread's CPU time: prefill_ms minus it = time not running
        transfers = [self.transfer.open(j.kv_target, j.request_id, self.layout, len(j.prompt_ids), j.deadline_s)
                     for j, _ in batch]
        try:
            return self._prefill(batch, transfers, start, cpu_start)
        except BaseException:
            for t in transfers:
                t.abort("prefill failed")  # no-op for one already committed
            raise

    def _prefill(self, batch: list[tuple[PrefillJob, float]], transfers: list, start: float,
                 cpu_start: float) -> list[PrefillResult]:
        jobs = [j for j, _ in batch]

        def on_layer(layer: int, i: int, k: np.ndarray, v: np.ndarray) -> None:
            transfers[i].send_layer(layer, k, v)

        logits, _, _ = self.model.prefill_batch([j.prompt_ids for j in jobs], on_layer)  # logits: (N, V)
        computed = time.perf_counter()
        cpu_ms = (time.thread_time() - cpu_start) * 1e3
        lengths = tuple(len(j.prompt_ids) for j in jobs)
        prefill_ms = (computed - start) * 1e3
        share = min(1.0, cpu_ms / prefill_ms) if cpu_ms > 0 and prefill_ms > 0 else 1.0  # the share of a core it got
        results = []
        for n, ((job, enqueued), t, row) in enumerate(zip(batch, transfers, logits)):
            first = sample_one(row, job.sampling, make_rng(job.sampling, job.sampled_before))
            outcome = t.commit()
            done = time.perf_counter()
            common = dict(queued_ms=(start - enqueued) * 1e3, prefill_ms=prefill_ms,
                          transfer_tail_ms=(done - computed) * 1e3)
            error = None if outcome.ok else Failure(outcome.error_code or "INTERNAL", outcome.error)
            results.append(PrefillResult(job.request_id, first, batch_lengths=lengths, first_in_batch=n == 0,
                                         error=error, kv_failed=error is not None, cpu_share=share, **common))
            log.info("prefilled", request_id=job.request_id, worker=self.worker_id, tokens=len(job.prompt_ids),
                     ok=outcome.ok, cpu_ms=round(cpu_ms, 2), **{k: round(v, 2) for k, v in common.items()})
        return results
