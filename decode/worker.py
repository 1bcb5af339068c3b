"""DecodeWorker: holds the model once, owns the KV pool, scheduler and core, runs the async step loop.

A plain class; pools wrap it with `ray.remote(DecodeWorker).options(resources={"cs3": 1})`. Every
public method is async (a Ray async actor runs them on its event loop). The heavy step runs in one
executor thread so the loop keeps serving submit/next_tokens/abort while the batch computes.

Handoff: the receiver writes the prompt's KV through `kv_sink` (open/write/commit), the frontend
calls `submit(request_id, first_token_id, params, prompt_ids)` with the token sampled on the
prefill side; either may come first. The sequence joins the batch once both have arrived.
In-process callers use `accept_kv()` instead of the receiver.

Local prefill (conditional disaggregation): `prefill_local(request_id, prompt_ids, params, ...)`
prefills a short prompt here, between two steps, writing its KV straight into this pool (no
transfer), samples the first token as the prefill side would, and joins the batch at once. The
running sequences wait for it: that stall is the router's to weigh (orchestrator/core/predictor.py).
With `local_chunk_tokens` (chunked local prefill, Sarathi-style) the prompt at the head instead rides
the steps while sequences decode, that many tokens a step, inside the step's own forward pass
(decode/core.py ChunkInput), so a step takes one chunk longer rather than waiting for a whole
prompt; with nothing to step, the rest of it runs whole (Transformer.prefill_chunk).

Streaming: poll `next_tokens(request_id)`; it blocks until new tokens exist or the request ends
and returns a TokenChunk (finished=True on the last one). A caller with many requests here (the
engine) submits them with an `owner` and long-polls `next_outputs(owner)` instead: one Ray call per
step for all of them, not one per request. Polling keeps Ray calls plain.
"""
from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import structlog
from threadpoolctl import threadpool_limits

from decode.core import ChunkInput, DecodeCore, model_layout
from decode.pool import PagedKVPool
from decode.scheduler import DecodeSeq, Finished, Scheduler, StepPlan
from decode.stream import RequestStream, TokenChunk
from kvtransfer.layout import KVLayout
from kvtransfer.sink import KVRefused
from kvtransfer.states import TransferState
from model.finish import Failure, FinishReason
from model.loaded import LoadedModel, load_model
from model.sampling import SamplingParams, make_rng, sample_one

log = structlog.get_logger("decode.worker")

ABORTED_KEPT = 4096  # aborted request ids remembered (oldest dropped first)
ORPHAN_KV_S = 60.0  # committed KV with no submit for this long is released (an engine that died mid-handoff)
RECENT_STEPS_KEPT = 64  # steps reported by load() since the last call (the oldest dropped first)


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One busy loop iteration of the step loop (schedule, forward, sample, stream): what a token costs."""

    batch: int  # sequences stepped
    context_tokens: int  # their cached context
    seconds: float  # wall time of the iteration
    chunk_tokens: int = 0  # of a local prefill that rode the step (0: none)
    cpu_share: float = 1.0  # CPU time of its forward and sample over their wall time x the step's threads: the
    # share of its cores the compute got (1: never descheduled; below 1 on a host whose cores other processes
    # share, the rest it waited; with blas_threads > 1 the process's CPU time, which counts its other threads)


@dataclass(frozen=True, slots=True)
class DecodeLoad:
    """What the router needs to place a request here."""

    active: int  # sequences in the running batch
    waiting: int  # admitted to the scheduler but not yet running (incl. preempted)
    free_blocks: int
    total_blocks: int
    block_size: int
    context_tokens: int  # cached context of every sequence running or waiting here
    remaining: tuple[tuple[int, int], ...] = ()  # (tokens it may still generate, context tokens it holds) of
    # each running sequence, ascending (Scheduler.running_remaining)
    kv_target: str = ""  # host:port of the KV receiver feeding this worker ("" = in-process only)
    steps: tuple[StepRecord, ...] = ()  # the steps since the last load()
    local_prefills: tuple[tuple[int, float], ...] = ()  # (prompt tokens, seconds) of the local prefills run
    # whole since the last load() (chunked: what was left of one when nothing stepped); each held up the batch
    orphans_released: int = 0  # committed KV never submitted, released by the ORPHAN_KV_S backstop (ever)

    @property
    def free_tokens(self) -> int:
        return self.free_blocks * self.block_size


@dataclass(frozen=True, slots=True)
class LocalPrefill:
    """A prompt prefilled by the decode worker itself (prefill_local): it is in the batch now, or it ended."""

    first_token: int = -1  # -1 when it did not run: aborted before or while it ran
    queued_ms: float = 0.0  # waiting for the step in flight and the local prefills ahead of it
    prefill_ms: float = 0.0

    @property
    def ran(self) -> bool:
        return self.first_token >= 0


@dataclass(slots=True)
class _LocalJob:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    enqueued: float  # perf_counter
    done: asyncio.Future  # -> LocalPrefill
    drawn: int = 0  # random draws its earlier tokens took (a migrated request's)
    prefilled: int = 0  # prompt tokens whose K/V exist (chunked local prefill)
    started: float = 0.0  # perf_counter of its first chunk
    ks: list = field(default_factory=list)  # per layer (prefilled, Hkv, Dh): the chunks' K/V so far
    vs: list = field(default_factory=list)


class DecodeWorker:
    """One decode instance: `capacity_tokens` or `capacity_bytes` of KV, up to `max_batch` sequences."""

    def __init__(self, *, capacity_tokens: int | None = None, capacity_bytes: int | None = None,
                 block_size: int = 64, max_batch: int = 64, blas_threads: int = 1,
                 loaded: LoadedModel | None = None, local_chunk_tokens: int = 0):
        """`local_chunk_tokens`: prompt tokens of a local prefill that ride each step (0: whole, between steps)."""
        if not isinstance(local_chunk_tokens, int) or local_chunk_tokens < 0:
            raise ValueError(f"local_chunk_tokens: must be an integer >= 0, got {local_chunk_tokens!r}")
        self.local_chunk_tokens = local_chunk_tokens
        self.blas_threads = blas_threads
        threadpool_limits(limits=blas_threads)  # process-wide: this actor owns its process
        self.loaded = loaded if loaded is not None else load_model()
        model = self.loaded.model
        self.pool = PagedKVPool(model_layout(model), block_size, capacity_tokens=capacity_tokens,
                                capacity_bytes=capacity_bytes, max_context=model.cfg.context_length)
        self.scheduler = Scheduler(self.pool.allocator, max_batch)
        self.core = DecodeCore(model, self.pool, threads=blas_threads)
        self._recent_steps: deque[StepRecord] = deque(maxlen=RECENT_STEPS_KEPT)
        self._recent_local: deque[tuple[int, float]] = deque(maxlen=RECENT_STEPS_KEPT)
        self._streams: dict[str, RequestStream] = {}
        self._outputs = asyncio.Event()  # set when any stream changes; next_outputs renews it
        self._committed: dict[str, float] = {}  # KV arrived, no submit yet -> monotonic time it committed
        self._local: deque[_LocalJob] = deque()  # local prefills, run by the step loop between steps
        # every request id aborted here: an id once aborted stays ended. A submit, local prefill or KV
        # commit of it that comes later (an Abort RPC can overtake the engine's calls, a frozen worker
        # resumes with a transfer still queued) ends at once and holds nothing. The engine gives each
        # attempt its own id, so a remembered abort never meets a new request.
        self._aborted: OrderedDict[str, None] = OrderedDict()
        self.orphans_released = 0  # committed KV that no submit claimed within ORPHAN_KV_S
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="decode-step")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self.pool.on_commit = lambda rid: self._call_in_loop(self._on_commit, rid)
        self.pool.on_abort = lambda rid: self._call_in_loop(self._abort_now, rid)
        self._early: list = []  # receiver callbacks that came before the loop started
        self.steps = 0
        self.kv_target = ""  # set by whoever starts a KV receiver for this worker

    # -- public API ------------------------------------------------------------------------

    @property
    def kv_sink(self) -> PagedKVPool:
        """The KVSink the kvtransfer receiver writes into."""
        return self.pool

    @property
    def layout(self) -> KVLayout:
        return self.pool.layout

    async def submit(self, request_id: str, first_token_id: int, params: SamplingParams,
                     prompt_ids: list[int] | None = None, owner: str = "", priority: int = 0,
                     generated: list[int] | tuple[int, ...] = ()) -> None:
        """Register a request whose first token was sampled by prefill. ValueError on bad input.

        prompt_ids lets the worker rebuild the KV itself if the sequence is ever preempted;
        without them a preempted request ends with an UNAVAILABLE error. With an owner, the
        request's tokens go to `next_outputs(owner)`; without one, to `next_tokens(request_id)`.
        `priority`: its SLA class's (under KV pressure the lowest is preempted first).
        `generated`: tokens an earlier attempt already streamed (a migrated request; prompt_ids and
        the KV then hold them too): the stream continues after them, at their index, their text and
        random draws accounted for, and max_tokens counts them.
        """
        self._start()
        params.validate()
        vocab = self.loaded.model.cfg.vocab_size
        if not 0 <= first_token_id < vocab:
            raise ValueError(f"first_token_id: {first_token_id} outside [0, {vocab})")
        aborted = request_id in self._aborted
        stream = self._new_stream(request_id, params, prompt_ids, owner, priority, generated)
        stream.first_token_id = first_token_id
        if aborted:
            stream.finish(FinishReason.ABORT)
        elif self._committed.pop(request_id, None) is not None:
            self._join(request_id)

    def _new_stream(self, request_id: str, params: SamplingParams, prompt_ids: list[int] | None, owner: str,
                    priority: int, generated: list[int] | tuple[int, ...] = ()) -> RequestStream:
        """Register a request's stream (ValueError if the id is live here)."""
        if request_id in self._streams:
            raise ValueError(f"request_id: {request_id!r} is already submitted")
        if len(generated) >= params.max_tokens:
            raise ValueError(f"generated: {len(generated)} tokens leave none of max_tokens={params.max_tokens}")
        # the earlier tokens took a draw each, and the prefill side (or _local_compute) one for the first here
        rng = make_rng(params, len(generated) + 1)
        stream = RequestStream.create(request_id, params, prompt_ids, self.loaded.tokenizer, rng, owner,
                                      self._notify_outputs if owner else None)
        stream.continue_after(list(generated))
        stream.priority = priority
        self._streams[request_id] = stream
        return stream

    async def prefill_local(self, request_id: str, prompt_ids: list[int], params: SamplingParams, owner: str = "",
                            priority: int = 0, generated: list[int] | tuple[int, ...] = ()) -> LocalPrefill:
        """Prefill `prompt_ids` here and join the batch (module docstring); resolves once it has joined
        (its first token is streamed like a submitted one) or ended. ValueError on bad input,
        KVRefused when its KV does not fit now; an abort ends it at any point, holding nothing.
        `generated`: as submit's (prompt_ids then end with them)."""
        self._start()
        params.validate()
        vocab = self.loaded.model.cfg.vocab_size
        if not prompt_ids or not all(isinstance(t, int) and 0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"prompt_ids: need at least one token id in [0, {vocab})")
        self._check_fits(request_id, len(prompt_ids), params.max_tokens - len(generated))
        if request_id in self._streams:
            raise ValueError(f"request_id: {request_id!r} is already submitted")
        if request_id in self._aborted:  # its abort overtook this call
            return LocalPrefill()
        self.pool.open(request_id, self.layout, len(prompt_ids))  # reserves its blocks, or KVRefused
        try:
            self._new_stream(request_id, params, list(prompt_ids), owner, priority, generated)
        except ValueError:
            self._release_unscheduled(request_id)
            raise
        job = _LocalJob(request_id, list(prompt_ids), params, time.perf_counter(), self._loop.create_future(),
                        len(generated))
        self._local.append(job)
        self._wake.set()
        return await job.done

    def _local_live(self, job: _LocalJob) -> bool:
        """The local prefill's request still wants it (not aborted, not ended)."""
        stream = self._streams.get(job.request_id)
        return (stream is not None and not stream.finished
                and self.pool.state(job.request_id) is TransferState.TRANSFERRING)

    async def _run_local(self, loop: asyncio.AbstractEventLoop, job: _LocalJob) -> None:
        """Step loop, between steps: what the local prefill at the head has left, whole; then the request
        joins the batch (no transfer) and leaves the queue."""
        first, t0 = -1, time.perf_counter()
        if self._local_live(job):
            n = len(job.prompt_ids) - job.prefilled
            try:
                first = await loop.run_in_executor(self._executor, self._local_compute, job)
            except KVRefused:  # aborted while it ran: the abort released its blocks and ended its stream
                first = -1
            except Exception:  # a bug in the prefill: fail this request, keep the worker alive
                log.exception("local prefill failed", request_id=job.request_id)
                self._fail_local(job)
            self._recent_local.append((n, time.perf_counter() - t0))
        self._end_local(job, first, t0)

    def _end_local(self, job: _LocalJob, first: int, t0: float) -> None:
        """The head local prefill is done (`first`: its first token) or ended (-1): it joins the batch, or
        not, and leaves the queue. t0: perf_counter when its last part started."""
        if first >= 0:
            try:
                self.pool.commit(job.request_id)
            except KVRefused:  # aborted just now
                first = -1
        result = LocalPrefill()
        if first >= 0:
            self._streams[job.request_id].first_token_id = first
            self._join(job.request_id)  # now, not when the commit callback runs: the next step includes it
            started = job.started or t0
            result = LocalPrefill(first, (started - job.enqueued) * 1e3, (time.perf_counter() - started) * 1e3)
        if self._local and self._local[0] is job:
            self._local.popleft()
        job.ks = job.vs = []
        if not job.done.done():
            job.done.set_result(result)

    def _fail_local(self, job: _LocalJob) -> None:
        stream = self._streams.get(job.request_id)
        if stream is not None:
            self._fail(stream, Failure("INTERNAL", "local prefill failed"))
        if self.pool.state(job.request_id) is not None:
            self._release_unscheduled(job.request_id)

    def _local_compute(self, job: _LocalJob) -> int:
        """Executor thread: the prompt tokens not yet prefilled, into this pool's blocks layer by layer
        (attending to the chunks before them); the first token, sampled."""
        at = job.prefilled
        write = lambda layer, k, v: self.pool.write(job.request_id, layer, at, k, v)  # noqa: E731
        logits, _, _ = self.loaded.model.prefill_chunk(job.prompt_ids[at:], job.ks, job.vs, on_layer=write)  # (V,)
        job.prefilled = len(job.prompt_ids)
        return sample_one(logits, job.params, make_rng(job.params, job.drawn))

    def _riding_chunk(self) -> ChunkInput | None:
        """The next chunk of the local prefill at the head, to ride this step (None: nothing to ride)."""
        if not (self.local_chunk_tokens and self._local and self._local_live(self._local[0])):
            return None
        job = self._local[0]
        ids = job.prompt_ids[job.prefilled:job.prefilled + self.local_chunk_tokens]
        job.started = job.started or time.perf_counter()
        return ChunkInput(np.asarray(ids, dtype=np.int64), job.prefilled, job.ks, job.vs,
                          last=job.prefilled + len(ids) == len(job.prompt_ids))

    def _chunk_rode(self, chunk: ChunkInput, written: bool, t0: float) -> None:
        """After the step it rode: the head local prefill has its chunk's K/V (in the pool if `written`,
        else it was aborted meanwhile); on its last chunk it is done."""
        job = self._local[0]
        if not written:
            self._end_local(job, -1, t0)
        elif not chunk.last:
            job.prefilled += len(chunk.token_ids)
            job.ks = [np.concatenate([a, b]) for a, b in zip(job.ks, chunk.ks)] if job.ks else chunk.ks
            job.vs = [np.concatenate([a, b]) for a, b in zip(job.vs, chunk.vs)] if job.vs else chunk.vs
        else:
            job.prefilled += len(chunk.token_ids)
            self._end_local(job, sample_one(chunk.logits, job.params, make_rng(job.params, job.drawn)), t0)

    async def accept_kv(self, request_id: str, ks: list[np.ndarray], vs: list[np.ndarray], first_token_id: int,
                        params: SamplingParams, prompt_ids: list[int] | None = None, owner: str = "") -> None:
        """In-process handoff: ks, vs are per-layer (T, Hkv, Dh) from prefill. Raises KVRefused."""
        self._start()
        self._check_fits(request_id, int(ks[0].shape[0]) if ks else 0, params.max_tokens)
        self.pool.load_sequence(request_id, ks, vs)  # commit -> _on_commit, scheduled on the loop
        await self.submit(request_id, first_token_id, params, prompt_ids, owner)

    async def next_tokens(self, request_id: str, timeout: float | None = None) -> TokenChunk:
        """Block until the request has new tokens or ended; the finished chunk is the last one."""
        stream = self._streams.get(request_id)
        if stream is None:
            raise KeyError(f"request_id: {request_id!r} is unknown or already drained")
        if not stream.ready:
            async with asyncio.timeout(timeout):
                await stream.changed.wait()
        return self._take(stream)

    async def next_outputs(self, owner: str, timeout: float | None = None) -> list[TokenChunk]:
        """Block until any of `owner`'s requests has new tokens or ended; return a chunk for each such
        request ([] after `timeout` seconds). Finished requests are dropped after their last chunk."""
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        while True:
            chunks = [self._take(s) for s in list(self._streams.values()) if s.owner == owner and s.ready]
            if chunks:
                return chunks
            changed = self._outputs
            if changed.is_set():  # it recorded changes already handed out: wait for the next one
                self._outputs = changed = asyncio.Event()
            try:  # one deadline for the whole call: wakes for other owners' changes do not re-arm it
                async with asyncio.timeout_at(deadline):
                    await changed.wait()
            except TimeoutError:
                return []

    def _notify_outputs(self) -> None:
        self._outputs.set()  # the current event: next_outputs replaces it

    def _take(self, stream: RequestStream) -> TokenChunk:
        chunk = stream.take()
        if chunk.finished:
            del self._streams[stream.request_id]
        return chunk

    async def abort(self, request_id: str) -> None:
        """Stop a request wherever it is (transfer, queue or batch); its blocks are released."""
        self._abort_now(request_id)

    async def load(self) -> DecodeLoad:
        """The router's view of this worker, and the steps run since the last call (then forgotten)."""
        sch, alloc = self.scheduler, self.pool.allocator
        steps, self._recent_steps = tuple(self._recent_steps), deque(maxlen=RECENT_STEPS_KEPT)
        local, self._recent_local = tuple(self._recent_local), deque(maxlen=RECENT_STEPS_KEPT)
        return DecodeLoad(sch.n_running, sch.n_waiting, alloc.free_blocks, alloc.n_blocks, alloc.block_size,
                          sch.context_tokens, tuple(sch.running_remaining()), self.kv_target, steps, local,
                          self.orphans_released)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=True)

    async def start(self) -> None:
        """Start the step loop (also done by the first submit)."""
        self._start()

    # -- joining a request with its KV -----------------------------------------------------

    def _start(self) -> None:
        with self.pool.lock:
            if self._task is not None:
                return
            self._loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
            self._task = self._loop.create_task(self._run())
            self._task.add_done_callback(self._loop_ended)
            early, self._early = self._early, []
        for fn, rid in early:
            fn(rid)

    @staticmethod
    def _loop_ended(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("decode step loop died", error=repr(task.exception()))

    def _call_in_loop(self, fn, rid: str) -> None:
        """Run fn(rid) on the event loop; callbacks from receiver threads land here."""
        with self.pool.lock:
            if self._loop is None:
                self._early.append((fn, rid))
                return
        self._loop.call_soon_threadsafe(fn, rid)

    def _check_fits(self, request_id: str, n_tokens: int, max_tokens: int) -> None:
        limit = min(self.pool.allocator.capacity_tokens, self.loaded.model.cfg.context_length)
        if n_tokens + max_tokens > limit:
            raise KVRefused("RESOURCE_EXHAUSTED", f"{request_id}: {n_tokens} prompt + {max_tokens} max_tokens "
                                                  f"exceed the capacity of {limit} tokens")

    def _on_commit(self, request_id: str) -> None:
        if self.pool.state(request_id) is not TransferState.COMMITTED:
            return  # aborted meanwhile
        if request_id in self._aborted:  # KV that arrived after its abort (a late or resumed transfer)
            log.info("kv of an aborted request released", request_id=request_id)
            self._release_unscheduled(request_id)
        elif request_id in self._streams:
            self._join(request_id)
        else:
            self._committed[request_id] = time.monotonic()

    def _join(self, request_id: str) -> None:
        stream = self._streams[request_id]
        n_tokens = self.pool.claim(request_id)
        left = stream.params.max_tokens - stream.emitted_before  # an earlier attempt streamed the others
        try:
            self._check_fits(request_id, n_tokens, left)
        except KVRefused as e:
            self._release_unscheduled(request_id)
            return self._fail(stream, Failure(e.code, str(e)))
        first = stream.first_token_id
        hit = stream.push(first)
        seq = DecodeSeq(request_id, n_tokens, [first], left, stream.stop_token_ids, stream.priority)
        with self.pool.lock:
            done = self.scheduler.add(seq)
            if done is None and hit:
                done = self.scheduler.abort(request_id, FinishReason.STOP)
        if done is not None:
            self._finished(done)
        log.debug("joined", request_id=request_id, n_tokens=n_tokens)
        self._wake.set()

    def _release_orphans(self) -> None:
        """Release committed KV that no submit claimed within ORPHAN_KV_S: a backstop (the engine that
        sent it died between the transfer and its submit), counted in `orphans_released`."""
        if not self._committed:
            return
        cutoff = time.monotonic() - ORPHAN_KV_S
        for rid in [r for r, t in self._committed.items() if t < cutoff]:
            del self._committed[rid]
            if self.pool.state(rid) is TransferState.COMMITTED:
                log.warning("orphaned kv released: committed, never submitted", request_id=rid,
                            after_s=ORPHAN_KV_S)
                self._release_unscheduled(rid)
                self.orphans_released += 1

    def _release_unscheduled(self, request_id: str) -> None:
        with self.pool.lock:
            self.pool.allocator.release(request_id)
            self.pool.forget(request_id)

    def _abort_now(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        self._aborted[request_id] = None
        while len(self._aborted) > ABORTED_KEPT:
            self._aborted.popitem(last=False)
        with self.pool.lock:
            done = self.scheduler.abort(request_id)
        if done is not None:
            self._finished(done)
        elif self.scheduler.get(request_id) is None:  # not scheduled: maybe a transfer in progress
            self._committed.pop(request_id, None)
            if self.pool.state(request_id) is not None:
                self._release_unscheduled(request_id)
            if stream is not None:
                stream.finish(FinishReason.ABORT)
        if self._wake is not None:
            self._wake.set()  # freed blocks may admit a preempted sequence

    def _fail(self, stream: RequestStream, error: Failure) -> None:
        stream.finish(FinishReason.ERROR, error)
        log.warning("request failed", request_id=stream.request_id, code=error.code, error=error.message)

    def _finished(self, done: Finished) -> None:
        self.pool.forget(done.request_id)
        stream = self._streams.get(done.request_id)
        if stream is not None:  # a stop string ends it with STOP even on the token that reached max_tokens
            stream.finish(FinishReason.STOP if stream.stopped else done.reason)

    # -- the step loop -------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._release_orphans()
            # between steps, whole: the stall the router counted (chunked: only ended ones, dropped)
            while self._local and (not self.local_chunk_tokens or not self._local_live(self._local[0])):
                await self._run_local(loop, self._local[0])
            with self.pool.lock:
                plan = self.scheduler.schedule()
            for rid in plan.preempted:
                log.info("preempted", request_id=rid)
            if plan.empty and self._local:  # chunked, with nothing to step: the rest of the head runs whole
                await self._run_local(loop, self._local[0])
                continue
            if plan.empty:
                self._wake.clear()
                try:  # idle: wake for work, or to look for orphaned KV again
                    async with asyncio.timeout(ORPHAN_KV_S / 4):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                continue
            t0 = time.perf_counter()
            recompute = self._recompute_jobs(plan)
            batch = self.core.batch_input([s.request_id for s in plan.batch], [s.next_token for s in plan.batch],
                                          [s.context_len for s in plan.batch])
            streams = [self._streams.get(s.request_id) for s in plan.batch]
            params = [st.params if st else SamplingParams() for st in streams]
            rngs = [st.rng if st else None for st in streams]
            chunk = self._riding_chunk()
            written, share = False, 1.0
            try:
                tokens, written, share = await loop.run_in_executor(self._executor, self._compute, recompute, batch,
                                                                    params, rngs, chunk)
            except Exception:  # a bug in the step: fail the batch, keep the worker alive
                log.exception("decode step failed", request_ids=[s.request_id for s in plan.batch])
                tokens = np.zeros(len(plan.batch), dtype=np.int64)
                for s in plan.batch:
                    if s.request_id in self._streams:
                        self._fail(self._streams[s.request_id], Failure("INTERNAL", "decode step failed"))
                    with self.pool.lock:
                        self.scheduler.abort(s.request_id)  # deferred to on_step_done
                if chunk is not None:  # the local prefill riding it fails with it
                    self._fail_local(self._local[0])
            self.steps += 1
            end = time.perf_counter()
            for st in streams:
                if st is not None:
                    st.stepped(t0, end)
            self._apply(plan, tokens)
            await asyncio.sleep(0)  # the calls that came during the step run here: part of its cost
            self._recent_steps.append(StepRecord(len(plan.batch), int(batch.positions.sum()), time.perf_counter() - t0,
                                                 0 if chunk is None else len(chunk.token_ids), share))
            if chunk is not None:
                self._chunk_rode(chunk, written, t0)

    def _recompute_jobs(self, plan: StepPlan) -> list[tuple[str, list[int]]]:
        jobs = []
        for seq in plan.recompute:
            stream = self._streams.get(seq.request_id)
            if stream is None or stream.prompt_ids is None:
                with self.pool.lock:
                    self.scheduler.abort(seq.request_id)  # deferred: the step is in flight
                if stream is not None:
                    self._fail(stream, Failure("UNAVAILABLE", "preempted and no prompt_ids to rebuild the KV"))
                continue
            jobs.append((seq.request_id, stream.prompt_ids + seq.generated[:-1]))
        return jobs

    def _compute(self, recompute, batch, params, rngs, chunk: ChunkInput | None = None
                 ) -> tuple[np.ndarray, bool, float]:
        """Executor thread: rebuild preempted KV, run the step (with `chunk` riding it), sample: (B,) token
        ids, whether the chunk's K/V went into the pool (False: none, or its request was aborted), and the
        share of a core it got (StepRecord.cpu_share)."""
        clock = time.thread_time if self.core.threads == 1 else time.process_time  # BLAS and helper threads too
        wall, cpu = time.perf_counter(), clock()
        for rid, history in recompute:
            self.core.recompute(rid, history)
        logits = self.core.forward(batch, chunk)  # (B, V)
        written = False
        if chunk is not None:
            rid = self._local[0].request_id
            try:
                for layer, (k, v) in enumerate(zip(chunk.ks, chunk.vs)):
                    self.pool.write(rid, layer, chunk.start, k, v)
                written = True
            except KVRefused:  # aborted during the step: its blocks are gone
                pass
        tokens = self.core.sample(logits, params, rngs)
        used, took = clock() - cpu, (time.perf_counter() - wall) * self.core.threads
        return tokens, written, min(1.0, used / took) if used > 0 and took > 0 else 1.0

    def _apply(self, plan: StepPlan, tokens: np.ndarray) -> None:
        """Stream the step's tokens, then end what finished (stop token, length, stop string, abort)."""
        with self.pool.lock:
            done = self.scheduler.on_step_done(tokens)
        for seq, tok in zip(plan.batch, tokens):
            stream = self._streams.get(seq.request_id)
            if stream is None or seq.abort_pending:
                continue
            if stream.push(int(tok)) and seq.finish_reason is None:
                with self.pool.lock:
                    d = self.scheduler.abort(seq.request_id, FinishReason.STOP)
                if d is not None:
                    done.append(d)
        for d in done:
            self._finished(d)
