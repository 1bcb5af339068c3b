"""In-process transport for tests: the receiver runs in this process's threads, as under gRPC.

Mirrors gRPC's threading: a pump thread consumes the sender's frames, a handler thread runs
`KVReceiver.handle`, cancellation and the deadline wake both sides and run terminate callbacks.
Process-local: it opens no port, so only code in this process can reach its receivers, and it
checks no transfer token (the gRPC backend does, kvtransfer/grpc_backend.py).
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Iterable, Iterator, Mapping

from kvtransfer.receiver import KVReceiver
from kvtransfer.sender import FrameCall, SenderConfig, TransferBackend
from kvtransfer.states import TransportError

_END = object()


class _LocalCall:
    def __init__(self, receiver: KVReceiver, frames: Iterable[bytes], timeout_s: float):
        self._deadline = time.monotonic() + timeout_s
        self._inbox: queue.Queue = queue.Queue()
        self._outbox: queue.Queue = queue.Queue()
        self._ended = threading.Event()
        self._code: str | None = None
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._pump, args=(iter(frames),), daemon=True, name="kv-local-pump").start()
        threading.Thread(target=self._serve, args=(receiver,), daemon=True, name="kv-local-recv").start()

    def _pump(self, frames: Iterator[bytes]) -> None:
        for frame in frames:
            if self._ended.is_set():
                return
            self._inbox.put(frame)
        self._inbox.put(_END)

    def _get(self, box: queue.Queue):
        """The next item of `box`, or _END once the call's deadline has passed (which terminates it)."""
        try:
            return box.get(timeout=max(0.0, self._deadline - time.monotonic()))
        except queue.Empty:
            self.terminate("DEADLINE_EXCEEDED")
            return _END

    def _incoming(self) -> Iterator[bytes]:
        while True:
            item = self._get(self._inbox)
            if self._ended.is_set():
                raise TransportError(self._code or "CANCELLED", "call terminated")
            if item is _END:
                return
            yield item

    def _serve(self, receiver: KVReceiver) -> None:
        try:
            for reply in receiver.handle(self._incoming(), self._callbacks.append):
                self._outbox.put(reply)
        except TransportError:
            pass
        self._outbox.put(_END)

    def terminate(self, code: str) -> None:
        """Like a gRPC cancel or deadline: wake both sides, run the receiver's terminate callbacks."""
        with self._lock:
            if self._ended.is_set():
                return
            self._code = code
            self._ended.set()
        self._inbox.put(_END)
        self._outbox.put(_END)
        for cb in self._callbacks:
            cb()

    def cancel(self) -> None:
        self.terminate("CANCELLED")

    def __iter__(self) -> Iterator[bytes]:
        while True:
            item = self._get(self._outbox)
            if item is _END:
                if self._code is not None:
                    raise TransportError(self._code, "call terminated")
                return
            yield item


class InProcessBackend(TransferBackend):
    """Targets name receivers in this process: {"decode-0": KVReceiver(sink)}, or one receiver for all."""

    def __init__(self, receivers: Mapping[str, KVReceiver] | KVReceiver, config: SenderConfig | None = None):
        super().__init__(config)
        self._receivers = receivers

    def open_call(self, target: str, frames: Iterable[bytes], timeout_s: float) -> FrameCall:
        if isinstance(self._receivers, KVReceiver):
            return _LocalCall(self._receivers, frames, timeout_s)
        if target not in self._receivers:
            raise ValueError(f"target: no in-process receiver named {target!r}")
        return _LocalCall(self._receivers[target], frames, timeout_s)
