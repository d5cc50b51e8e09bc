"""BlockPool: reference counts and the free blocks of one pool of physical blocks.

A block is *used* (referenced by at least one table) or *free*.  Free blocks come in
two kinds, kept apart so that allocation never throws away reusable K/V while a block
holding nothing is still available (vLLM's rule):

* **empty** blocks hold nothing anyone may reuse.  They live on a stack and are taken
  first, most recently freed first (its memory is the warmest).
* **cached** blocks still hold K/V that the prefix index can serve.  They are evicted
  (their cache entry dropped through ``on_evict``) only when no empty block is left,
  least recently freed first.  A hit on a cached free block takes it back in O(1).

Everything is numpy arrays, so a whole table is taken, shared or released in a few
array operations, and so is a run of evictions.  The LRU order is a queue of
``(block, stamp)`` entries appended as blocks are freed; taking a block back (a hit)
or uncaching it only clears its stamp, and eviction skips entries whose stamp is
stale (lazy deletion, compacted when half the queue is dead).

The pool holds no keys and no array data: whether a freed block is worth caching is
the caller's (the prefix index's) answer.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .errors import InvariantError, OutOfBlocksError

__all__ = ["BlockPool"]

_EMPTY = np.zeros(0, dtype=np.int64)


class BlockPool:
    """Book-keeping for ``num_blocks`` physical blocks."""

    def __init__(self, num_blocks: int, *,
                 on_evict: Callable[[np.ndarray], None] | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        n = self.num_blocks = int(num_blocks)
        #: References to each block (tables holding it).
        self.ref = np.zeros(n, dtype=np.int32)
        # Empty free blocks: _stack[:_top]; the top is taken first.  Reversed so a
        # fresh pool hands out blocks 0, 1, 2, ... in order.
        self._stack = np.arange(n - 1, -1, -1, dtype=np.int64)
        self._top = n
        # Cached free blocks in LRU order: queue entries _queue[_head:_tail] are
        # (block, stamp); an entry is live while _stamp[block] equals its stamp.
        self._queue = np.zeros((max(2 * n, 16), 2), dtype=np.int64)
        self._head = self._tail = 0
        self._stamp = np.zeros(n, dtype=np.int64)  # 0: not cached-free
        self._clock = 0
        self._cached = 0
        self._on_evict = on_evict
        #: Cached blocks given up to make room (lifetime count).
        self.evictions = 0

    # --- counts -------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take (empty + evictable cached)."""
        return self._top + self._cached

    @property
    def num_cached_free(self) -> int:
        """Free blocks still holding servable K/V."""
        return self._cached

    @property
    def num_empty(self) -> int:
        return self._top

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def count_free(self, blocks: np.ndarray) -> int:
        """How many of ``blocks`` are free (cached but unreferenced)."""
        return int(np.count_nonzero(self.ref[blocks] == 0)) if blocks.size else 0

    # --- taking and giving back ---------------------------------------------------

    def allocate(self, count: int) -> np.ndarray:
        """``count`` blocks, each with one reference: empty blocks first, then the least
        recently freed cached blocks (evicted)."""
        if count > self.num_free:
            raise OutOfBlocksError(f"need {count} blocks, {self.num_free} are free")
        if count <= 0:
            return _EMPTY
        take = min(count, self._top)
        blocks = self._stack[self._top - take:self._top][::-1].copy()
        self._top -= take
        if count > take:
            evicted = self._evict(count - take)
            self.evictions += evicted.size
            if self._on_evict is not None:
                self._on_evict(evicted)
            blocks = np.concatenate([blocks, evicted])
        self.ref[blocks] = 1
        return blocks

    def _evict(self, count: int) -> np.ndarray:
        """Take the ``count`` least recently freed cached blocks out of the LRU (the
        caller checked there are that many)."""
        out = []
        need = count
        while need:
            window = self._queue[self._head:min(self._tail, self._head + 2 * need + 64)]
            if not window.shape[0]:
                raise InvariantError(f"the LRU ran out with {need} cached blocks still "
                                     f"counted ({self._cached})")
            live = np.flatnonzero(self._stamp[window[:, 0]] == window[:, 1])
            taken = live[:need]
            out.append(window[taken, 0])
            need -= taken.size
            # Past the last entry taken when done, else past the whole window.
            self._head += int(taken[-1]) + 1 if not need else window.shape[0]
        blocks = np.concatenate(out) if len(out) > 1 else out[0]
        self._stamp[blocks] = 0
        self._cached -= blocks.size
        return blocks

    def free(self, blocks: np.ndarray, keep: np.ndarray | None = None, *,
             unique: bool = True) -> np.ndarray:
        """Drop one reference per entry of ``blocks``.  Blocks reaching zero become
        free: cached in LRU order where ``keep`` (a bool per entry, the prefix index's
        verdict) says so, else empty.  A sequence's blocks are given in logical order
        and cached tail first, so its tail is evicted before its prefix.  Pass
        ``unique=False`` when an id may appear more than once (several tables' blocks
        at once).  Returns the blocks that became free."""
        if not blocks.size:
            return _EMPTY
        ref = self.ref
        if unique:
            ref[blocks] -= 1
        else:
            np.subtract.at(ref, blocks, 1)
            blocks, first = np.unique(blocks, return_index=True)
            order = np.argsort(first)  # back to first-seen order
            blocks = blocks[order]
            if keep is not None:
                keep = keep[first[order]]
        zero_mask = ref[blocks] == 0
        if not zero_mask.any():
            return _EMPTY
        zero = blocks[zero_mask]
        if keep is not None:
            kept = keep[zero_mask]
            self._enqueue(zero[kept][::-1])
            zero_empty = zero[~kept]
        else:
            zero_empty = zero
        if zero_empty.size:
            self._push(zero_empty[::-1])
        return zero

    def _enqueue(self, blocks: np.ndarray) -> None:
        """Append ``blocks`` to the LRU (most recently freed last)."""
        m = blocks.size
        if not m:
            return
        if self._tail + m > self._queue.shape[0]:
            self._compact(m)
        stamps = np.arange(self._clock + 1, self._clock + m + 1, dtype=np.int64)
        self._clock += m
        self._queue[self._tail:self._tail + m, 0] = blocks
        self._queue[self._tail:self._tail + m, 1] = stamps
        self._tail += m
        self._stamp[blocks] = stamps
        self._cached += m

    def _compact(self, room: int) -> None:
        """Drop dead entries (and grow if need be) so ``room`` more fit."""
        window = self._queue[self._head:self._tail]
        live = window[self._stamp[window[:, 0]] == window[:, 1]]
        size = max(self._queue.shape[0], 2 * (live.shape[0] + room))
        queue = np.zeros((size, 2), dtype=np.int64)
        queue[:live.shape[0]] = live
        self._queue, self._head, self._tail = queue, 0, live.shape[0]

    def _push(self, blocks: np.ndarray) -> None:
        end = self._top + blocks.size
        self._stack[self._top:end] = blocks
        self._top = end

    def acquire(self, blocks: np.ndarray) -> None:
        """One more reference to each of ``blocks`` (prefix hits, forks); free cached
        ones are taken back from the LRU."""
        if not blocks.size:
            return
        ref = self.ref
        reclaimed = blocks[ref[blocks] == 0]
        if reclaimed.size:
            self._stamp[reclaimed] = 0
            self._cached -= reclaimed.size
        ref[blocks] += 1

    def uncache(self, blocks: np.ndarray) -> None:
        """Free cached ``blocks`` lost their cache entry (gc, reset, a better copy took
        their key): move them to the empty blocks, without evicting through
        ``on_evict`` (the index already dropped them)."""
        if not blocks.size:
            return
        moved = blocks[self._stamp[blocks] != 0]
        if moved.size:
            self._stamp[moved] = 0
            self._cached -= moved.size
            self._push(moved)

    def cached_free_blocks(self) -> np.ndarray:
        """The free cached blocks, least recently freed first."""
        window = self._queue[self._head:self._tail]
        return window[self._stamp[window[:, 0]] == window[:, 1], 0].copy()

    # --- checking -----------------------------------------------------------------

    def check(self, holders: np.ndarray, cached: np.ndarray) -> None:
        """Raise :class:`InvariantError` unless the pool is consistent: ``holders[b]``
        is the number of tables holding block ``b`` and must equal its refcount;
        ``cached[b]`` is whether the prefix index can serve it (a free block is in the
        LRU exactly when it is cached)."""
        bad = np.flatnonzero(self.ref != holders)
        if bad.size:
            b = int(bad[0])
            raise InvariantError(f"block {b} has refcount {int(self.ref[b])} but "
                                 f"{int(holders[b])} tables hold it")
        empty = self._stack[:self._top]
        lru = self.cached_free_blocks()
        if lru.size != self._cached or np.count_nonzero(self._stamp) != self._cached:
            raise InvariantError(f"{lru.size} live LRU entries and "
                                 f"{np.count_nonzero(self._stamp)} stamped blocks, counter "
                                 f"says {self._cached}")
        free = np.concatenate([empty, lru])
        if np.unique(free).size != free.size:
            raise InvariantError("a free block is listed twice among the free blocks")
        if free.size and (self.ref[free] != 0).any():
            b = int(free[self.ref[free] != 0][0])
            raise InvariantError(f"block {b} is free with refcount {int(self.ref[b])}")
        if free.size != int(np.count_nonzero(self.ref == 0)):
            raise InvariantError(f"{free.size} blocks are listed free but "
                                 f"{int(np.count_nonzero(self.ref == 0))} have refcount 0")
        if lru.size and not cached[lru].all():
            b = int(lru[~cached[lru]][0])
            raise InvariantError(f"free block {b} is kept as cached but the index cannot "
                                 "serve it")
        if empty.size and cached[empty].any():
            b = int(empty[cached[empty]][0])
            raise InvariantError(f"free block {b} is servable but sits among the empty "
                                 "blocks (it would be overwritten before cached blocks)")
