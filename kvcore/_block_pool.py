"""BlockPool: reference counts, the free queue, and the prefix-cache index.

The free queue is an intrusive doubly-linked list over block ids (two Python lists,
``_next`` and ``_prev``, with a sentinel at index ``num_blocks``).  It doubles as the
LRU of prefix-cached blocks, the way vLLM's v1 block pool works:

* a block whose reference count drops to zero goes to the *tail* of the queue but
  keeps its hash, so a later request with the same prefix can take it back;
* taking back a cached block unlinks it from the middle of the queue in O(1);
* new allocations pop from the *head*, evicting the hash of whatever they pop, so the
  least recently freed cached block is evicted first.

Every operation is O(1) per block touched; nothing scans the pool.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from operator import itemgetter

import numpy as np

from .errors import InvariantError, OutOfBlocksError

__all__ = ["BlockPool"]


def _pick(values: list, indices: list[int]) -> tuple:
    """``tuple(values[i] for i in indices)``, in C."""
    return itemgetter(*indices)(values) if len(indices) > 1 else (values[indices[0]],)


class BlockPool:
    """Book-keeping for ``num_blocks`` physical blocks (no array data lives here)."""

    def __init__(self, num_blocks: int, block_size: int = 1) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        n = num_blocks
        self.num_blocks = n
        self.ref = [0] * n
        sentinel = n
        # 0 -> 1 -> ... -> n-1 -> sentinel -> 0: every block starts free, in id order.
        self._next = list(range(1, n + 1)) + [0]
        self._prev = [sentinel] + list(range(0, n))
        self._num_free = n
        # The prefix index.  _hash_of is the truth: a block is cached under key k iff
        # _hash_of[block] == k.  _by_hash may keep stale entries of evicted blocks
        # (eviction is one list store, not a dict delete); lookups check _hash_of, and
        # _purge drops the stale ones once the index holds 4x the pool (amortised O(1)).
        self._hash_of: list[int | None] = [None] * n
        self._tokens = np.zeros((n, block_size), dtype=np.int32)
        self._by_hash: dict[int, int] = {}
        self._num_cached = 0
        self._num_cached_free = 0
        self.evictions = 0

    # --- counts -------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take (plain free + evictable cached)."""
        return self._num_free

    @property
    def num_cached_free(self) -> int:
        """Free blocks that still hold a prefix-cached block."""
        return self._num_cached_free

    @property
    def num_used(self) -> int:
        return self.num_blocks - self._num_free

    # --- the queue ----------------------------------------------------------------

    def allocate(self, count: int) -> list[int]:
        """Take ``count`` blocks from the head of the queue, each with refcount 1,
        evicting the prefix-cache entry of any cached block taken."""
        if count > self._num_free:
            raise OutOfBlocksError(f"need {count} blocks, {self._num_free} free")
        taken = []
        nxt, prv, ref, hash_of = self._next, self._prev, self.ref, self._hash_of
        sentinel = self.num_blocks
        evicted = 0
        # Unlink the head; inlined because this loop runs once per block allocated.
        block = nxt[sentinel]
        for _ in range(count):
            after = nxt[block]
            nxt[sentinel] = after
            prv[after] = sentinel
            if hash_of[block] is not None:
                hash_of[block] = None
                evicted += 1
            ref[block] = 1
            taken.append(block)
            block = after
        self._num_free -= count
        if evicted:
            self._num_cached -= evicted
            self._num_cached_free -= evicted
            self.evictions += evicted
        return taken

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; blocks reaching zero join the queue's
        tail, last block first, so a sequence's tail is evicted before its prefix."""
        ref, hash_of, nxt, prv = self.ref, self._hash_of, self._next, self._prev
        sentinel = self.num_blocks
        freed = cached = 0
        for block in reversed(blocks):
            count = ref[block] - 1
            ref[block] = count
            if count == 0:
                # Append to the tail; inlined because this loop runs once per block freed.
                tail = prv[sentinel]
                nxt[tail] = block
                prv[block] = tail
                nxt[block] = sentinel
                prv[sentinel] = block
                freed += 1
                if hash_of[block] is not None:
                    cached += 1
        self._num_free += freed
        self._num_cached_free += cached

    def incref(self, blocks: Iterable[int]) -> None:
        """One more reference to blocks that are already in use (fork)."""
        ref = self.ref
        for block in blocks:
            ref[block] += 1

    # --- the prefix cache ---------------------------------------------------------

    def lookup_run(self, keys: list[int], rows: np.ndarray, complete: np.ndarray) -> list[int]:
        """The cached blocks of the longest run of leading ``keys`` whose stored token
        ids equal ``rows`` and whose K/V are ``complete``."""
        # map/index/itemgetter keep the per-block work in C: this runs for every block
        # of every prompt.
        get = self._by_hash.get
        if not keys or get(keys[0]) is None:  # the usual miss: a prompt seen first
            return []
        found = list(map(get, keys))
        if None in found:
            found = found[:found.index(None)]
        if not found:
            return found
        held = _pick(self._hash_of, found)
        if held != tuple(keys[:len(found)]):  # stale index entries of evicted blocks
            found = found[:next(i for i, (a, b) in enumerate(zip(held, keys)) if a != b)]
            if not found:
                return found
        # Confirm in bulk: a key collision must never hand out another prompt's K/V.
        index = np.array(found, dtype=np.intp)
        ok = complete[index] & (self._tokens[index] == rows[:len(found)]).all(axis=1)
        if not ok.all():
            found = found[:int(np.argmin(ok))]
        return found

    def count_free(self, blocks: list[int]) -> int:
        """How many of ``blocks`` are unreferenced (cached but free)."""
        return _pick(self.ref, blocks).count(0) if blocks else 0

    def count_free_after(self, blocks: list[int]) -> int:
        """How many of ``blocks`` one :meth:`free` would return to the queue."""
        return _pick(self.ref, blocks).count(1) if blocks else 0

    def acquire(self, blocks: list[int]) -> None:
        """Take a reference to cached blocks, pulling free ones off the queue."""
        ref, nxt, prv = self.ref, self._next, self._prev
        reclaimed = 0
        for block in blocks:
            if ref[block] == 0:
                after, before = nxt[block], prv[block]
                nxt[before] = after
                prv[after] = before
                reclaimed += 1
            ref[block] += 1
        self._num_free -= reclaimed
        self._num_cached_free -= reclaimed

    def register_run(self, blocks: Sequence[int], keys: list[int], rows: np.ndarray,
                     first: int) -> None:
        """Cache ``blocks[i]`` under ``keys[i]`` with token ids ``rows[i]`` for every
        ``i >= first``.  The blocks are in use and not cached; a key already cached
        keeps its block (first writer wins)."""
        if first >= len(keys):
            return
        by_hash, hash_of = self._by_hash, self._hash_of
        # Reversed, so that of two equal keys in one prompt the first block is kept.
        new = dict(zip(reversed(keys[first:]), reversed(blocks[first:len(keys)])))
        clash = [k for k in new.keys() & by_hash.keys() if hash_of[by_hash[k]] == k]
        for key in clash:
            del new[key]
        if len(by_hash) + len(new) > 4 * self.num_blocks:
            self._purge()
            by_hash = self._by_hash
        by_hash.update(new)
        for key, block in new.items():
            hash_of[block] = key
        self._num_cached += len(new)
        if len(new) == len(keys) - first:
            self._tokens[blocks[first:len(keys)]] = rows[first:]
        else:
            for i in range(first, len(keys)):
                if hash_of[blocks[i]] == keys[i]:
                    self._tokens[blocks[i]] = rows[i]

    def _purge(self) -> None:
        """Drop the index entries of evicted blocks."""
        hash_of = self._hash_of
        self._by_hash = {k: b for k, b in self._by_hash.items() if hash_of[b] == k}

    def is_cached(self, block: int) -> bool:
        return self._hash_of[block] is not None

    def evict_all_free(self) -> int:
        """Forget the prefix cache of every free block; returns how many."""
        count = 0
        sentinel = self.num_blocks
        block = self._next[sentinel]
        while block != sentinel:
            if self._hash_of[block] is not None:
                self._hash_of[block] = None
                count += 1
            block = self._next[block]
        self._num_cached -= count
        self._num_cached_free -= count
        self.evictions += count
        self._purge()
        return count

    # --- checking -----------------------------------------------------------------

    def check(self, holders: Counter[int]) -> None:
        """Raise :class:`InvariantError` unless the pool is consistent and every
        block's refcount equals the number of tables in ``holders`` that hold it."""
        sentinel = self.num_blocks
        seen: set[int] = set()
        block = self._next[sentinel]
        while block != sentinel:
            if block in seen:
                raise InvariantError(f"free queue revisits block {block} (cycle)")
            if self.ref[block] != 0:
                raise InvariantError(f"block {block} is queued as free with refcount "
                                     f"{self.ref[block]}")
            if self._next[self._prev[block]] != block:
                raise InvariantError(f"free queue links around block {block} are broken")
            seen.add(block)
            block = self._next[block]
        if len(seen) != self._num_free:
            raise InvariantError(f"free queue holds {len(seen)} blocks, counter says "
                                 f"{self._num_free}")
        cached_free = sum(1 for b in seen if self._hash_of[b] is not None)
        if cached_free != self._num_cached_free:
            raise InvariantError(f"{cached_free} free blocks are cached, counter says "
                                 f"{self._num_cached_free}")
        for block in range(self.num_blocks):
            want = holders.get(block, 0)
            if self.ref[block] != want:
                raise InvariantError(f"block {block} has refcount {self.ref[block]} but "
                                     f"{want} tables hold it")
            if want == 0 and block not in seen:
                raise InvariantError(f"block {block} is unreferenced but not in the free queue")
        cached = 0
        for block, h in enumerate(self._hash_of):
            if h is not None:
                cached += 1
                if self._by_hash.get(h) != block:
                    raise InvariantError(f"block {block} is cached under {h}, but the index "
                                         f"maps that key to {self._by_hash.get(h)}")
        if cached != self._num_cached:
            raise InvariantError(f"{cached} blocks are cached, counter says {self._num_cached}")
