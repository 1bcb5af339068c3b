"""Block allocator for the paged KV pool: pure bookkeeping, no storage, no clock, no I/O.

The pool is `n_blocks` blocks of `block_size` tokens (every layer of a token lives in the same
block index). Free blocks form a min-heap, so the lowest free ids go out first and the blocks in
use stay packed at the bottom of the pool (the decode core computes over that prefix). Each
sequence owns a block table: the ordered list of its block ids; token `t` of
a sequence lives in block `table[t // block_size]` at offset `t % block_size`. The live decode
worker and the simulator both drive this class.

Handoff admission is `reserve()`: when a sequence's KV transfer opens, it gets room for its
prompt plus the token the first decode step writes (`tokens_to_run`), or is refused holding
nothing; `release()` gives the blocks back if the transfer fails. The live KV pool (decode/pool.py)
and the simulator call it at the same point of the handoff.
"""
from __future__ import annotations

import heapq


def tokens_to_run(context_len: int, steps: int = 1) -> int:
    """Tokens a sequence with `context_len` stored tokens must own to run `steps` decode steps:
    each step writes the KV of the token it feeds at position context_len, which then grows by one."""
    return context_len + steps


class BlockAllocator:
    """Hands out fixed-size blocks to sequences and takes them back."""

    __slots__ = ("n_blocks", "block_size", "_free", "_tables")

    def __init__(self, n_blocks: int, block_size: int):
        if n_blocks < 1:
            raise ValueError(f"n_blocks: must be >= 1, got {n_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {block_size}")
        self.n_blocks = n_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(n_blocks))  # a min-heap of free block ids
        self._tables: dict[str, list[int]] = {}

    # -- accounting ------------------------------------------------------------------------

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.n_blocks - len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.n_blocks * self.block_size

    def blocks_for(self, n_tokens: int) -> int:
        """Blocks needed to hold n_tokens tokens."""
        return -(-n_tokens // self.block_size)

    def can_allocate(self, n_tokens: int) -> bool:
        """Would a new sequence of n_tokens fit right now?"""
        return self.blocks_for(n_tokens) <= len(self._free)

    def holds(self, seq_id: str) -> bool:
        return seq_id in self._tables

    def block_table(self, seq_id: str) -> list[int]:
        """The sequence's block ids in token order (the live list: do not mutate)."""
        return self._tables[seq_id]

    def capacity_of(self, seq_id: str) -> int:
        """Tokens the sequence can hold without another block."""
        return len(self._tables[seq_id]) * self.block_size

    # -- mutation --------------------------------------------------------------------------

    def allocate(self, seq_id: str, n_tokens: int) -> list[int]:
        """Give a new sequence room for n_tokens. Raises MemoryError (holding nothing) if short."""
        if seq_id in self._tables:
            raise ValueError(f"seq_id: {seq_id!r} already holds blocks")
        if n_tokens < 0:
            raise ValueError(f"n_tokens: must be >= 0, got {n_tokens}")
        need = self.blocks_for(n_tokens)
        if need > len(self._free):
            raise MemoryError(f"need {need} blocks for {n_tokens} tokens, {len(self._free)} free")
        table = [heapq.heappop(self._free) for _ in range(need)]
        self._tables[seq_id] = table
        return table

    def reserve(self, seq_id: str, n_tokens: int) -> bool:
        """Handoff admission: room for a new sequence of n_tokens and its first step, or False
        (holding nothing) when the free blocks cannot hold it."""
        need = tokens_to_run(n_tokens)
        if not self.can_allocate(need):
            return False
        self.allocate(seq_id, need)
        return True

    def extend(self, seq_id: str, n_tokens: int) -> bool:
        """Grow the sequence to hold n_tokens in total. False (nothing changed) if blocks run out."""
        table = self._tables[seq_id]
        need = self.blocks_for(n_tokens) - len(table)
        if need <= 0:
            return True
        if need > len(self._free):
            return False
        table.extend(heapq.heappop(self._free) for _ in range(need))
        return True

    def release(self, seq_id: str) -> int:
        """Return every block of the sequence; idempotent. Returns the number of blocks freed."""
        table = self._tables.pop(seq_id, None)
        if table is None:
            return 0
        for b in table:
            heapq.heappush(self._free, b)
        return len(table)

    def check(self) -> None:
        """Assert the invariant: every block is either free or in exactly one table."""
        owned = [b for t in self._tables.values() for b in t]
        seen = owned + self._free
        assert len(seen) == self.n_blocks, f"{len(seen)} blocks accounted for, pool has {self.n_blocks}"
        assert len(set(seen)) == self.n_blocks, "a block is owned twice or both owned and free"
