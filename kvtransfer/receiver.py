"""Receiver side of a KV handoff: turns a stream of frames into KVSink calls and a stream of replies.

Transport-agnostic: the gRPC server and the in-process backend both call `KVReceiver.handle`.
Every chunk is checked (sequence, range, size, checksum) and written straight from the received
bytes into the sink (np.frombuffer views, no copy before the sink's own). Whatever way a transfer
ends short of commit - refusal, corruption, sender abort, cancellation, deadline - sink.abort runs.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import structlog

from kvtransfer import wire
from kvtransfer.layout import KVLayout
from kvtransfer.sink import KVRefused, KVSink
from protos.disagg.v1 import kvtransfer_pb2 as pb

log = structlog.get_logger("kvtransfer.receiver")


@dataclass(slots=True)
class _Session:
    request_id: str
    layout: KVLayout
    n_tokens: int
    scheme: int
    ack_every: int
    deadline: float  # time.monotonic()
    covered: np.ndarray  # (n_layers, n_tokens) bool: tokens written per layer
    next_seq: int = 1
    chunks: int = 0
    bytes: int = 0
    done: bool = False  # committed or released
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(slots=True)
class ReceiverStats:
    active: int = 0
    committed: int = 0
    released: int = 0
    bytes: int = 0


class KVReceiver:
    """Feeds one KVSink from any number of concurrent transfer streams."""

    def __init__(self, sink: KVSink, expected_layout: KVLayout | None = None):
        self.sink = sink
        self.expected_layout = expected_layout
        self.stats = ReceiverStats()
        self._active: set[str] = set()
        self._lock = threading.Lock()

    def handle(self, frames: Iterable[bytes],
               on_terminate: Callable[[Callable[[], None]], object] | None = None) -> Iterator[bytes]:
        """Generator of replies for one stream. `on_terminate(cb)` registers cb to run when the transport
        ends the call (cancel, deadline): it releases a transfer whose handler is stuck or gone."""
        session: _Session | None = None
        try:
            for frame in frames:
                try:
                    header, offset = wire.decode(frame)
                    kind = header.WhichOneof("kind")
                    if session is None:
                        if kind != "open":
                            raise KVRefused("INVALID_ARGUMENT", f"frame: expected open first, got {kind}")
                        session = self._open(header.open)
                        if on_terminate is not None:
                            on_terminate(lambda s=session: self._release(s, "call terminated"))
                        yield wire.reply(pb.KV_REPLY_ACK, 0)
                    elif kind == "chunk":
                        self._chunk(session, header.chunk, frame, offset)
                        if header.chunk.seq % session.ack_every == 0:
                            yield wire.reply(pb.KV_REPLY_ACK, header.chunk.seq)
                    elif kind == "commit":
                        self._commit(session, header.commit)
                        yield wire.reply(pb.KV_REPLY_COMMITTED, header.commit.seq)
                        return
                    elif kind == "abort":
                        self._release(session, f"sender aborted: {header.abort.reason}")
                        yield wire.reply(pb.KV_REPLY_ABORTED, header.abort.seq)
                        return
                    else:
                        raise KVRefused("INVALID_ARGUMENT", f"frame: unexpected {kind}")
                except KVRefused as e:
                    rid = session.request_id if session else ""
                    log.info("kv transfer refused", request_id=rid, code=e.code, error=str(e))
                    if session is not None:
                        self._release(session, f"{e.code}: {e}")
                    yield wire.reply(pb.KV_REPLY_ERROR, 0, e.code, str(e))
                    return
                except ValueError as e:  # malformed frame
                    if session is not None:
                        self._release(session, f"malformed frame: {e}")
                    yield wire.reply(pb.KV_REPLY_ERROR, 0, "INVALID_ARGUMENT", f"frame: {e}")
                    return
                except Exception as e:  # a sink bug: release, tell the sender, keep serving
                    log.exception("kv receiver failed", request_id=session.request_id if session else "")
                    if session is not None:
                        self._release(session, f"internal error: {e!r}")
                    yield wire.reply(pb.KV_REPLY_ERROR, 0, "INTERNAL", repr(e))
                    return
        finally:
            if session is not None:
                self._release(session, "stream ended before commit")

    # -- frames --------------------------------------------------------------------------------

    def _open(self, msg: pb.KVOpen) -> _Session:
        layout = wire.layout_from_msg(msg.layout)
        if self.expected_layout is not None:
            diff = self.expected_layout.mismatch(layout)
            if diff:
                raise KVRefused("INVALID_ARGUMENT", f"layout.{diff}")
        sizes = {"layout.n_layers": layout.n_layers, "layout.n_kv_heads": layout.n_kv_heads,
                 "layout.head_dim": layout.head_dim, "n_tokens": msg.n_tokens}
        for name, value in sizes.items():
            if value < 1:
                raise KVRefused("INVALID_ARGUMENT", f"{name}: {value} must be >= 1")
        if msg.checksum not in wire.CHECKSUMS.values():
            raise KVRefused("INVALID_ARGUMENT", f"checksum: unknown scheme {msg.checksum}")
        if layout.dtype not in wire.DTYPES:  # not any numpy dtype string: np.dtype() parses far too much
            raise KVRefused("INVALID_ARGUMENT", f"layout.dtype: {layout.dtype[:40]!r} is not one of {wire.DTYPES}")
        with self._lock:
            if msg.request_id in self._active:
                raise KVRefused("ALREADY_EXISTS", f"request_id: {msg.request_id} is already transferring")
            self._active.add(msg.request_id)
        try:
            self.sink.open(msg.request_id, layout, msg.n_tokens)
        except BaseException:
            with self._lock:
                self._active.discard(msg.request_id)
            raise
        with self._lock:
            self.stats.active += 1
        timeout_s = msg.timeout_ms / 1e3 if msg.timeout_ms > 0 else 3600.0
        log.debug("kv transfer opened", request_id=msg.request_id, n_tokens=msg.n_tokens)
        return _Session(msg.request_id, layout, msg.n_tokens, msg.checksum, max(1, msg.window // 2),
                        time.monotonic() + timeout_s, np.zeros((layout.n_layers, msg.n_tokens), dtype=bool))

    def _chunk(self, s: _Session, h: pb.KVChunkHeader, frame: bytes, offset: int) -> None:
        where = f"chunk seq {h.seq} (layer {h.layer}, tokens {h.token_start}+{h.n_tokens})"
        if time.monotonic() > s.deadline:
            raise KVRefused("DEADLINE_EXCEEDED", f"deadline passed at {where}")
        if h.seq != s.next_seq:
            raise KVRefused("INVALID_ARGUMENT", f"seq: expected {s.next_seq}, got {h.seq}")
        if not 0 <= h.layer < s.layout.n_layers:
            raise KVRefused("OUT_OF_RANGE", f"layer: {where} outside [0, {s.layout.n_layers})")
        if h.n_tokens < 1 or h.token_start < 0 or h.token_start + h.n_tokens > s.n_tokens:
            raise KVRefused("OUT_OF_RANGE", f"token_start: {where} outside [0, {s.n_tokens})")
        size = h.n_tokens * s.layout.bytes_per_token_per_layer
        if h.payload_bytes != size or len(frame) - offset != size:
            raise KVRefused("DATA_LOSS", f"payload_bytes: {where} has {len(frame) - offset}, expected {size}")
        payload = memoryview(frame)[offset:]
        if s.scheme != pb.CHECKSUM_NONE and wire.checksum(s.scheme, payload) != h.checksum:
            raise KVRefused("DATA_LOSS", f"checksum: mismatch in {where}")
        span = s.covered[h.layer, h.token_start:h.token_start + h.n_tokens]
        if span.any():
            raise KVRefused("INVALID_ARGUMENT", f"token_start: {where} overlaps tokens already received")
        k, v = wire.payload_arrays(frame, offset, s.layout, h.n_tokens)
        with s.lock:
            if s.done:
                raise KVRefused("CANCELLED", "transfer already released")
            self.sink.write(s.request_id, h.layer, h.token_start, k, v)
        span[:] = True
        s.next_seq += 1
        s.chunks += 1
        s.bytes += size

    def _commit(self, s: _Session, h: pb.KVCommit) -> None:
        if h.seq != s.next_seq or h.n_chunks != s.chunks:
            raise KVRefused("DATA_LOSS", f"commit: seq {h.seq} / {h.n_chunks} chunks, received {s.chunks}")
        missing = np.flatnonzero(~s.covered.all(axis=1))
        if missing.size:
            raise KVRefused("DATA_LOSS", f"commit: layers {missing.tolist()} incomplete")
        with s.lock:
            if s.done:
                raise KVRefused("CANCELLED", "transfer already released")
            self.sink.commit(s.request_id)
            s.done = True
        self._forget(s, committed=True)
        log.debug("kv transfer committed", request_id=s.request_id, bytes=s.bytes, chunks=s.chunks)

    def _release(self, s: _Session, reason: str) -> None:
        """Idempotent: sink.abort once for a transfer that did not commit."""
        with s.lock:
            if s.done:
                return
            s.done = True
            try:
                self.sink.abort(s.request_id)
            finally:
                self._forget(s, committed=False)
        log.info("kv transfer released", request_id=s.request_id, reason=reason, chunks=s.chunks)

    def _forget(self, s: _Session, committed: bool) -> None:
        with self._lock:
            self._active.discard(s.request_id)
            self.stats.active -= 1
            self.stats.bytes += s.bytes
            if committed:
                self.stats.committed += 1
            else:
                self.stats.released += 1
