"""BlockPool: reference counts and the free blocks of one pool of physical blocks.

A block is *used* (referenced by at least one table) or *free*.  Free blocks come in
two kinds, kept apart so that allocation never throws away reusable K/V while a block
holding nothing is still available (vLLM's rule):

* **empty** blocks hold nothing anyone may reuse.  They live on a stack and are taken
  first, most recently freed first (its memory is the warmest).
* **cached** blocks still hold K/V that the prefix index can serve.  They live in LRU
  order, least recently freed first, and are evicted (their cache entry dropped
  through ``on_evict``) only when no empty block is left.  A hit on a cached free
  block takes it back in O(1).

Reference counts are a numpy array so that a whole table is taken, shared or
released in a few array operations; only evicting or reclaiming cached blocks costs
Python work per block.  The pool holds no keys and no array data: whether a freed
block is worth caching is the caller's (the prefix index's) answer.
"""

from __future__ import annotations

from collections import OrderedDict
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
        self.num_blocks = int(num_blocks)
        #: References to each block (tables holding it).
        self.ref = np.zeros(num_blocks, dtype=np.int32)
        # Empty free blocks: _stack[:_top]; the top is taken first.  Reversed so a
        # fresh pool hands out blocks 0, 1, 2, ... in order.
        self._stack = np.arange(num_blocks - 1, -1, -1, dtype=np.int64)
        self._top = self.num_blocks
        # Cached free blocks, least recently freed first.
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._on_evict = on_evict
        #: Cached blocks given up to make room (lifetime count).
        self.evictions = 0

    # --- counts -------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take (empty + evictable cached)."""
        return self._top + len(self._lru)

    @property
    def num_cached_free(self) -> int:
        """Free blocks still holding servable K/V."""
        return len(self._lru)

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
            popitem = self._lru.popitem
            evicted = np.fromiter((popitem(last=False)[0] for _ in range(count - take)),
                                  dtype=np.int64, count=count - take)
            self.evictions += evicted.size
            if self._on_evict is not None:
                self._on_evict(evicted)
            blocks = np.concatenate([blocks, evicted])
        self.ref[blocks] = 1
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
            cached = zero[kept][::-1]
            zero_empty = zero[~kept]
            lru = self._lru
            for block in cached.tolist():
                lru[block] = None
        else:
            zero_empty = zero
        if zero_empty.size:
            self._push(zero_empty[::-1])
        return zero

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
            lru = self._lru
            for block in reclaimed.tolist():
                del lru[block]
        ref[blocks] += 1

    def uncache(self, blocks: np.ndarray) -> None:
        """Free cached ``blocks`` lost their cache entry (gc, reset, a better copy took
        their key): move them to the empty blocks, without evicting through
        ``on_evict`` (the index already dropped them)."""
        lru = self._lru
        moved = [b for b in blocks.tolist() if b in lru]
        for block in moved:
            del lru[block]
        if moved:
            self._push(np.asarray(moved, dtype=np.int64))

    def cached_free_blocks(self) -> np.ndarray:
        """The free cached blocks, least recently freed first."""
        return np.fromiter(self._lru, dtype=np.int64, count=len(self._lru))

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
