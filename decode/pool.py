"""Paged KV pool: preallocated K/V block storage for every layer, and the KVSink the receiver writes to.

Storage per layer and per K/V is (Hkv, n_blocks, block_size, Dh) float32, so a batch's blocks
gather with one `np.take(..., axis=1)` into (Hkv, B, n, block_size, Dh) = (Hkv, B, T, Dh).
Block bookkeeping is the pure BlockAllocator; this class adds the bytes and the transfer states.

A transfer goes TRANSFERRING (blocks reserved by the shared admission rule, BlockAllocator.reserve:
its tokens and the first step's, so a committed sequence is always admissible) -> COMMITTED (every
layer of every token written; `on_commit` is called) -> CLAIMED (by the scheduler, which owns the
blocks from then on); states are kvtransfer.states.TransferState. All methods
are thread-safe: the gRPC receiver calls them from its own threads.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np

from decode.allocator import BlockAllocator, tokens_to_run
from kvtransfer.layout import KVLayout
from kvtransfer.sink import KVRefused
from kvtransfer.states import TransferState


@dataclass(slots=True)
class _Transfer:
    n_tokens: int
    filled: np.ndarray  # (L,) tokens written per layer
    state: TransferState = TransferState.TRANSFERRING


class PagedKVPool:
    """KV storage in blocks; implements kvtransfer.sink.KVSink."""

    def __init__(self, layout: KVLayout, block_size: int = 16, *, capacity_tokens: int | None = None,
                 capacity_bytes: int | None = None, max_context: int | None = None, prefault: bool = True):
        if (capacity_tokens is None) == (capacity_bytes is None):
            raise ValueError("capacity: give exactly one of capacity_tokens, capacity_bytes")
        if layout.dtype != "float32":
            raise ValueError(f"layout.dtype: the pool stores float32, got {layout.dtype}")
        self.layout = layout
        self.block_size = block_size
        self.bytes_per_block = layout.bytes_for(block_size)
        if capacity_bytes is not None:
            n_blocks = capacity_bytes // self.bytes_per_block
        else:
            n_blocks = capacity_tokens // block_size
        if n_blocks < 1:
            raise ValueError(f"capacity: less than one block of {block_size} tokens")
        self.allocator = BlockAllocator(n_blocks, block_size)
        self.max_context = max_context
        shape = (layout.n_layers, layout.n_kv_heads, n_blocks, block_size, layout.head_dim)
        self.k = np.zeros(shape, dtype=np.float32)  # (L, Hkv, n_blocks, bs, Dh)
        self.v = np.zeros(shape, dtype=np.float32)
        if prefault:  # touch every page now, not on the decode hot path (~35 ms per layer per batch)
            self.k.fill(0.0)
            self.v.fill(0.0)
        # One head's Dh floats as one element: `store` then moves whole rows, not floats (~15% faster)
        self._row = np.dtype((np.void, layout.head_dim * self.k.itemsize))
        self._k_rows = self.k.view(self._row)[..., 0]  # (L, Hkv, n_blocks, bs)
        self._v_rows = self.v.view(self._row)[..., 0]
        self.lock = threading.RLock()
        self._transfers: dict[str, _Transfer] = {}
        self.on_commit: Callable[[str], None] | None = None  # called after a successful commit
        self.on_abort: Callable[[str], None] | None = None  # abort() of a CLAIMED sequence

    # -- accounting ------------------------------------------------------------------------

    @property
    def capacity_bytes(self) -> int:
        return self.allocator.n_blocks * self.bytes_per_block

    @property
    def free_bytes(self) -> int:
        return self.allocator.free_blocks * self.bytes_per_block

    @property
    def used_bytes(self) -> int:
        return self.allocator.used_blocks * self.bytes_per_block

    def n_tokens(self, request_id: str) -> int:
        return self._transfers[request_id].n_tokens

    def state(self, request_id: str) -> TransferState | None:
        t = self._transfers.get(request_id)
        return None if t is None else t.state

    # -- KVSink --------------------------------------------------------------------------

    def open(self, request_id: str, layout: KVLayout, n_tokens: int) -> None:
        """Handoff admission (BlockAllocator.reserve): blocks for n_tokens and the first step, or
        KVRefused holding nothing."""
        problem = self.layout.mismatch(layout)
        if problem is not None:
            raise KVRefused("INVALID_ARGUMENT", f"KV layout mismatch: {problem}")
        if not isinstance(n_tokens, int) or n_tokens < 1:
            raise KVRefused("INVALID_ARGUMENT", f"n_tokens: must be >= 1, got {n_tokens}")
        if self.max_context is not None and n_tokens >= self.max_context:
            raise KVRefused("OUT_OF_RANGE", f"n_tokens: {n_tokens} leaves no room in the context "
                                            f"window of {self.max_context}")
        with self.lock:
            if request_id in self._transfers or self.allocator.holds(request_id):
                raise KVRefused("ALREADY_EXISTS", f"request_id: {request_id!r} already holds KV")
            if not self.allocator.reserve(request_id, n_tokens):
                need = self.allocator.blocks_for(tokens_to_run(n_tokens))
                raise KVRefused("RESOURCE_EXHAUSTED",
                                f"KV pool: {n_tokens} tokens need {need} blocks, "
                                f"{self.allocator.free_blocks} of {self.allocator.n_blocks} free")
            self._transfers[request_id] = _Transfer(n_tokens, np.zeros(self.layout.n_layers, np.int64))

    def write(self, request_id: str, layer: int, token_start: int, k: np.ndarray, v: np.ndarray) -> None:
        """k, v: (n, Hkv, Dh) for tokens [token_start, token_start + n) of `layer`."""
        with self.lock:
            t = self._transfers.get(request_id)
            if t is None or t.state is not TransferState.TRANSFERRING:
                raise KVRefused("NOT_FOUND", f"request_id: {request_id!r} has no open transfer")
            expect = (self.layout.n_kv_heads, self.layout.head_dim)
            if k.shape != v.shape or k.ndim != 3 or k.shape[1:] != expect:
                raise KVRefused("INVALID_ARGUMENT", f"k/v shape: expected (n, {expect[0]}, {expect[1]}), "
                                                    f"got {k.shape} and {v.shape}")
            if not 0 <= layer < self.layout.n_layers:
                raise KVRefused("INVALID_ARGUMENT", f"layer: {layer} outside [0, {self.layout.n_layers})")
            if token_start < 0 or token_start + k.shape[0] > t.n_tokens:
                raise KVRefused("OUT_OF_RANGE", f"tokens [{token_start}, {token_start + k.shape[0]}) "
                                                f"outside the {t.n_tokens} announced")
            self.store(request_id, layer, token_start, k, v)
            t.filled[layer] += k.shape[0]

    def commit(self, request_id: str) -> None:
        with self.lock:
            t = self._transfers.get(request_id)
            if t is None or t.state is not TransferState.TRANSFERRING:
                raise KVRefused("NOT_FOUND", f"request_id: {request_id!r} has no open transfer")
            short = np.flatnonzero(t.filled != t.n_tokens)
            if short.size:
                layer = int(short[0])
                raise KVRefused("INVALID_ARGUMENT", f"token count: layer {layer} got {int(t.filled[layer])} "
                                                    f"of {t.n_tokens} tokens")
            t.state = TransferState.COMMITTED
        if self.on_commit is not None:
            self.on_commit(request_id)

    def abort(self, request_id: str) -> None:
        """Release an open or committed transfer; a CLAIMED one is handed to `on_abort`."""
        with self.lock:
            t = self._transfers.get(request_id)
            if t is None:
                return
            if t.state is not TransferState.CLAIMED:
                del self._transfers[request_id]
                self.allocator.release(request_id)
                return
        if self.on_abort is not None:
            self.on_abort(request_id)

    # -- used by the worker ------------------------------------------------------------------

    def claim(self, request_id: str) -> int:
        """Hand a committed sequence to the scheduler; returns its token count."""
        with self.lock:
            t = self._transfers[request_id]
            assert t.state is TransferState.COMMITTED, f"{request_id}: claim of a {t.state} transfer"
            t.state = TransferState.CLAIMED
            return t.n_tokens

    def forget(self, request_id: str) -> None:
        """Drop the transfer record once the scheduler has released the blocks."""
        with self.lock:
            self._transfers.pop(request_id, None)

    def store(self, request_id: str, layer: int, token_start: int, k: np.ndarray, v: np.ndarray) -> None:
        """Copy k, v: (n, Hkv, Dh) into the sequence's blocks; no state checks (recompute uses it).

        Whole blocks go in one block-granular copy; only the partial blocks at either end are
        scattered token by token.
        """
        bs, n = self.block_size, k.shape[0]
        k_rows, v_rows = self._as_rows(k), self._as_rows(v)  # (n, Hkv)
        table = np.asarray(self.allocator.block_table(request_id), dtype=np.int64)
        first_full = -(-token_start // bs)  # first block that starts inside the range
        last_full = (token_start + n) // bs  # blocks [first_full, last_full) are covered whole
        lo, hi = 0, 0  # rows of k that go in whole blocks
        if last_full > first_full:
            lo, hi = first_full * bs - token_start, last_full * bs - token_start
            blocks = table[first_full:last_full]
            shape = (last_full - first_full, bs, k_rows.shape[1])
            self._k_rows[layer][:, blocks] = k_rows[lo:hi].reshape(shape).transpose(2, 0, 1)  # (Hkv, nb, bs)
            self._v_rows[layer][:, blocks] = v_rows[lo:hi].reshape(shape).transpose(2, 0, 1)
        if hi - lo < n:
            rows = np.r_[0:lo, hi:n]
            pos = token_start + rows
            blocks, offs = table[pos // bs], pos % bs  # (r,) each
            self._k_rows[layer][:, blocks, offs] = k_rows[rows].T  # (Hkv, r)
            self._v_rows[layer][:, blocks, offs] = v_rows[rows].T

    def _as_rows(self, x: np.ndarray) -> np.ndarray:
        """(n, Hkv, Dh) float32 -> (n, Hkv) of `_row` elements (a view when x is C-contiguous)."""
        return np.ascontiguousarray(x, dtype=np.float32).view(self._row)[..., 0]

    def load_sequence(self, request_id: str, ks: list[np.ndarray], vs: list[np.ndarray]) -> None:
        """In-process transfer: open, write every layer, commit. Raises KVRefused like the wire,
        holding nothing afterwards. ks, vs: per layer (T, Hkv, Dh)."""
        if len(ks) != len(vs) or not ks or any(np.ndim(k) != 3 for k in ks):
            raise KVRefused("INVALID_ARGUMENT", "ks/vs: need one (T, Hkv, Dh) array per layer for both")
        layout = KVLayout(len(ks), ks[0].shape[1], ks[0].shape[2], str(ks[0].dtype))
        self.open(request_id, layout, int(ks[0].shape[0]))
        try:
            for layer, (k, v) in enumerate(zip(ks, vs)):
                self.write(request_id, layer, 0, k, v)
            self.commit(request_id)
        except BaseException:
            self.abort(request_id)
            raise
