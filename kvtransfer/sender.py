"""Sender side of a KV handoff: a prefill worker streams each layer as soon as the model computes it.

    t = backend.open(target, request_id, layout, n_tokens, deadline_s)
    t.send_layer(layer, k, v)   # k, v: (T, n_kv_heads, head_dim); returns at once (keeps a reference)
    result = t.commit()         # waits for the receiver's acknowledgement -> TransferResult

Frames are built lazily (checksum + the frame's one copy of the payload) by the generator the transport
consumes in its own thread, at most `window` unacknowledged frames ahead of the receiver; a reader
thread turns replies into state changes. No producer thread: a handoff per frame cost more CPU
(~0.12 CPU-s/GB, measured) than building a 1 MB frame (~0.13) that it would have overlapped; with
the window at 32, a thread building up to 2 frames ahead moved 2.21-2.29 GB/s against 2.48-2.50
inline (bench.kvtransfer, three alternating pairs).
"""
from __future__ import annotations

import abc
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator, Protocol

import numpy as np
import structlog

from kvtransfer import wire
from kvtransfer.faults import KVFaults, corrupt
from kvtransfer.layout import KVLayout
from kvtransfer.states import TransferResult, TransferState, TransportError
from protos.disagg.v1 import kvtransfer_pb2 as pb

log = structlog.get_logger("kvtransfer.sender")
_COMMIT = "commit"
_ABORT_GRACE_S = 0.5
_COMMIT_POLL_S = 0.05  # commit() checks the deadline and the stall timeout this often


@dataclass(frozen=True, slots=True)
class SenderConfig:
    chunk_bytes: int = 1 << 20  # payload bytes per frame (K + V), 256 KB - 1 MB works best
    # max unacknowledged frames in flight; the receiver acks every window // 2. An ack can wait a GIL
    # switch interval (5 ms, ~15 MB at 3 GB/s) for its thread on either end, so 8 stalled the sender:
    # 32 moved 7% more (2.70 vs 2.53 GB/s, medians of six alternating bench runs)
    window: int = 32
    checksum: str = wire.DEFAULT_CHECKSUM  # "xxh3", "crc32", "adler32" or "none"
    # once commit() is called every frame is ready to go: a transfer that then neither sends a frame nor
    # gets an acknowledgement for this long has stalled (a frozen link or receiver) and fails at once,
    # releasing both sides, instead of waiting out its deadline
    stall_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        if self.chunk_bytes < 1 or self.window < 1:
            raise ValueError("chunk_bytes and window must be >= 1")
        if not self.stall_timeout_s > 0:
            raise ValueError("stall_timeout_s: must be > 0")
        if self.checksum not in wire.CHECKSUMS:
            raise ValueError(f"checksum: must be one of {sorted(wire.CHECKSUMS)}")


class FrameCall(Protocol):
    """One open transport call: iterate the receiver's replies (raises TransportError); cancel() ends it."""

    def __iter__(self) -> Iterator[bytes]: ...

    def cancel(self) -> None: ...


class TransferBackend(abc.ABC):
    """The one interface a transport implements: carry frames to `target`, bring replies back."""

    def __init__(self, config: SenderConfig | None = None):
        self.config = config or SenderConfig()
        self.faults = KVFaults()  # what the chaos command asks the next transfers to suffer (kvtransfer/faults.py)

    @abc.abstractmethod
    def open_call(self, target: str, frames: Iterable[bytes], timeout_s: float) -> FrameCall:
        """Start consuming `frames` in the background; the call must end by timeout_s."""

    def open(self, target: str, request_id: str, layout: KVLayout, n_tokens: int, deadline_s: float) -> "Transfer":
        """Start a transfer of n_tokens of KV to the receiver at `target`; deadline_s: seconds from now."""
        return Transfer(self, target, request_id, layout, n_tokens, deadline_s, self.config)

    def close(self) -> None:
        """Release transport resources (channels)."""


class Transfer:
    """One request's handoff. Thread-safe: send_layer/commit/abort from the caller, frames and replies
    from transport threads; every shared field is guarded by one lock (one condition on it)."""

    def __init__(self, backend: TransferBackend, target: str, request_id: str, layout: KVLayout,
                 n_tokens: int, deadline_s: float, config: SenderConfig):
        if n_tokens < 1:
            raise ValueError("n_tokens: must be >= 1")
        if deadline_s <= 0:
            raise ValueError("deadline_s: must be > 0")
        self.request_id, self.layout, self.n_tokens, self.config = request_id, layout, n_tokens, config
        self._scheme = wire.CHECKSUMS[config.checksum]
        self._tokens_per_chunk = max(1, config.chunk_bytes // layout.bytes_per_token_per_layer)
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # frame builder waits: layers to cut, window room
        self._pending: deque = deque()  # (layer, k, v) ..., then _COMMIT
        self._layers_sent: set[int] = set()
        self._state = TransferState.PENDING
        self._code: str | None = None
        self._error = ""
        self._sent_seq = 0   # the open frame is seq 0
        self._acked_seq = -1
        self._max_in_flight = self._chunks = self._bytes = 0
        self._start = time.perf_counter()
        self._deadline = time.monotonic() + deadline_s
        self._commit_called = self._end = 0.0
        self._done = threading.Event()
        self._progress_at = time.monotonic()  # the last frame sent or acknowledgement received
        self._faults, self._fault = backend.faults, backend.faults.take()
        self._call = backend.open_call(target, self._frames(), deadline_s)
        threading.Thread(target=self._read_replies, name=f"kv-replies-{request_id}", daemon=True).start()

    # -- caller API --------------------------------------------------------------------------

    @property
    def state(self) -> TransferState:
        return self._state

    def send_layer(self, layer: int, k: np.ndarray, v: np.ndarray) -> TransferState:
        """Queue one layer's K/V (T, n_kv_heads, head_dim); never blocks. Do not mutate k, v afterwards."""
        shape = (self.n_tokens, self.layout.n_kv_heads, self.layout.head_dim)
        for name, a in (("k", k), ("v", v)):
            if a.shape != shape:
                raise ValueError(f"{name}: shape {a.shape}, expected {shape}")
            if a.dtype != np.dtype(self.layout.dtype):
                raise ValueError(f"{name}: dtype {a.dtype}, expected {self.layout.dtype}")
        if not 0 <= layer < self.layout.n_layers:
            raise ValueError(f"layer: {layer} outside [0, {self.layout.n_layers})")
        with self._lock:
            if self._state.terminal:
                return self._state
            if layer in self._layers_sent:
                raise ValueError(f"layer: {layer} sent twice")
            self._layers_sent.add(layer)
            self._pending.append((layer, k, v))
            self._work.notify()
            return self._state

    def commit(self) -> TransferResult:
        """Wait for the receiver to commit every layer (or for failure / the deadline)."""
        with self._lock:
            if not self._state.terminal:
                missing = sorted(set(range(self.layout.n_layers)) - self._layers_sent)
                if missing:
                    self._finish_locked(TransferState.FAILED, "FAILED_PRECONDITION", f"layers never sent: {missing}")
                else:
                    self._commit_called = time.perf_counter()
                    self._progress_at = time.monotonic()
                    self._pending.append(_COMMIT)
                    self._work.notify()
        end = self._deadline + 1.0
        while not self._done.wait(_COMMIT_POLL_S):
            now = time.monotonic()
            stalled = now - self._progress_at
            if now >= end:
                self._finish(TransferState.FAILED, "DEADLINE_EXCEEDED", "no acknowledgement before the deadline")
            elif stalled > self.config.stall_timeout_s:
                self._finish(TransferState.FAILED, "DEADLINE_EXCEEDED",
                             f"stalled: no frame sent or acknowledged for {stalled:.1f} s")
            else:
                continue
            self._call.cancel()  # the receiver's side is released at once
            break
        return self.result()

    def abort(self, reason: str = "aborted by sender") -> TransferResult:
        """Stop now and return: the receiver gets a KVAbort frame; if the stream is stuck, the call is
        cancelled after `_ABORT_GRACE_S`, which releases the receiver's side just the same."""
        with self._lock:
            already = self._state.terminal
            self._finish_locked(TransferState.ABORTED, "CANCELLED", reason)  # _frames sends KVAbort
        if already:
            return self.result()
        timer = threading.Timer(_ABORT_GRACE_S, self._call.cancel)  # no-op once the stream has ended
        timer.daemon = True
        timer.start()
        return self.result()

    def result(self) -> TransferResult:
        with self._lock:
            end = self._end or time.perf_counter()
            return TransferResult(self.request_id, self._state, self._code, self._error, self._bytes, self._chunks,
                                  (end - self._start) * 1e3,
                                  (end - self._commit_called) * 1e3 if self._commit_called else 0.0,
                                  self._max_in_flight)

    # -- state ---------------------------------------------------------------------------------

    def _finish(self, state: TransferState, code: str | None = None, error: str = "") -> None:
        with self._lock:
            self._finish_locked(state, code, error)

    def _finish_locked(self, state: TransferState, code: str | None, error: str) -> None:
        if self._state.terminal:
            return
        self._state, self._code, self._error = state, code, error
        self._pending.clear()  # drop references to the caller's arrays
        self._end = time.perf_counter()
        self._work.notify_all()
        self._done.set()
        fields = dict(request_id=self.request_id, state=state.value, bytes=self._bytes, chunks=self._chunks,
                      ms=round((self._end - self._start) * 1e3, 2))
        if state is TransferState.COMMITTED:
            log.debug("kv transfer committed", **fields)
        else:
            log.info("kv transfer ended", code=code, error=error, **fields)

    def _wait_locked(self, cond: threading.Condition, ready) -> bool:
        """Wait on cond until ready() or the deadline; on timeout the transfer FAILS and False is returned."""
        while not ready():
            left = self._deadline - time.monotonic()
            if left <= 0:
                self._finish_locked(TransferState.FAILED, "DEADLINE_EXCEEDED", "deadline passed while sending")
                return False
            cond.wait(left)
        return True

    # -- transport threads -------------------------------------------------------------------

    def _build(self) -> Iterator[tuple[bytes, bool]]:
        """Queued layers -> (frame, is_last): checksum + one copy. Waits for layers and window room;
        returns when the transfer ends. A frame counts as in flight (window) once built."""
        while True:
            with self._lock:
                if not self._wait_locked(self._work, lambda: self._pending or self._state.terminal) \
                        or self._state.terminal:
                    return
                item = self._pending.popleft()
            if item is _COMMIT:
                with self._lock:
                    self._sent_seq += 1
                    frame = wire.encode(pb.KVFrameHeader(commit=pb.KVCommit(
                        seq=self._sent_seq, n_chunks=self._chunks, total_bytes=self._bytes)))
                yield frame, True
                return
            layer, k, v = item
            k, v = np.ascontiguousarray(k), np.ascontiguousarray(v)  # no copy when already contiguous
            step = self._tokens_per_chunk
            for t0 in range(0, self.n_tokens, step):
                kc, vc = k[t0:t0 + step], v[t0:t0 + step]
                with self._lock:
                    window = self.config.window
                    if not self._wait_locked(self._work, lambda: self._state.terminal or (
                            self._sent_seq - self._acked_seq < window)) \
                            or self._state.terminal:
                        return
                    self._sent_seq += 1
                    seq = self._sent_seq
                    self._max_in_flight = max(self._max_in_flight, self._sent_seq - self._acked_seq)
                    self._chunks += 1
                    self._bytes += kc.nbytes + vc.nbytes
                yield self._chunk_frame(seq, layer, t0, kc, vc), False

    def _chunk_frame(self, seq: int, layer: int, t0: int, kc: np.ndarray, vc: np.ndarray) -> bytes:
        """Checksum (pulls the chunk into cache), then the frame's one copy of the payload."""
        return wire.encode(pb.KVFrameHeader(chunk=pb.KVChunkHeader(
            seq=seq, layer=layer, token_start=t0, n_tokens=len(kc), checksum=wire.checksum(self._scheme, kc, vc),
            payload_bytes=kc.nbytes + vc.nbytes)), kc, vc)

    def _frames(self) -> Iterator[bytes]:
        """Consumed by the transport's thread: open, prepared chunks, then commit or abort."""
        left_ms = (self._deadline - time.monotonic()) * 1e3
        yield wire.encode(pb.KVFrameHeader(open=pb.KVOpen(
            request_id=self.request_id, layout=wire.layout_to_msg(self.layout), n_tokens=self.n_tokens,
            checksum=self._scheme, window=self.config.window, timeout_ms=left_ms)))
        for frame, last in self._build():
            if self._fault is not None and not last:  # the first chunk frame: the fault ends the frames
                yield from self._faulty(frame)
                return
            self._progress_at = time.monotonic()
            yield frame
            if last:
                return
        with self._lock:
            if self._state is not TransferState.ABORTED:
                return
            frame = wire.encode(pb.KVFrameHeader(abort=pb.KVAbort(reason=self._error)))
        yield frame

    def _faulty(self, frame: bytes) -> Iterator[bytes]:
        """The first chunk frame under this transfer's injected fault, and the end of its frames."""
        kind = self._fault
        self._faults.fire(kind, self.request_id)
        log.info("kv fault injected", request_id=self.request_id, fault=kind)
        yield corrupt(frame) if kind == "corrupt" else frame
        if kind != "truncate":  # stall: the link froze; corrupt: the receiver refuses it. Either way
            self._done.wait(max(0.0, self._deadline - time.monotonic()) + 1.0)  # nothing more is sent
        # truncate: the stream ends here, with no commit

    def _read_replies(self) -> None:
        try:
            for raw in self._call:
                r = pb.KVReply.FromString(raw)
                if r.kind == pb.KV_REPLY_ACK:
                    self._progress_at = time.monotonic()
                    with self._lock:
                        self._acked_seq = max(self._acked_seq, r.acked_seq)
                        if self._state is TransferState.PENDING:
                            self._state = TransferState.TRANSFERRING
                        self._work.notify()
                elif r.kind == pb.KV_REPLY_COMMITTED:
                    self._finish(TransferState.COMMITTED)
                elif r.kind == pb.KV_REPLY_ABORTED:
                    self._finish(TransferState.ABORTED, "CANCELLED", "aborted")
                else:
                    self._finish(TransferState.FAILED, r.code or "INTERNAL", r.message)
            self._finish(TransferState.FAILED, "UNAVAILABLE", "receiver ended the stream without committing")
        except TransportError as e:
            self._finish(TransferState.FAILED, e.code, e.message)
        except Exception as e:  # a bug in reply handling must still release both sides
            log.exception("kv reply reader crashed", request_id=self.request_id)
            self._finish(TransferState.FAILED, "INTERNAL", repr(e))
        if self._state is not TransferState.COMMITTED:
            self._call.cancel()
