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

from .errors import InvariantError, OutOfBlocksError

__all__ = ["BlockPool"]


class BlockPool:
    """Book-keeping for ``num_blocks`` physical blocks (no array data lives here)."""

    def __init__(self, num_blocks: int) -> None:
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
        self._hash_of: list[int | None] = [None] * n
        self._tokens_of: list[bytes | None] = [None] * n
        self._by_hash: dict[int, int] = {}
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

    def _unlink(self, block: int) -> None:
        nxt, prv = self._next[block], self._prev[block]
        self._next[prv] = nxt
        self._prev[nxt] = prv

    def _append(self, block: int) -> None:
        sentinel = self.num_blocks
        tail = self._prev[sentinel]
        self._next[tail] = block
        self._prev[block] = tail
        self._next[block] = sentinel
        self._prev[sentinel] = block

    def allocate(self, count: int) -> list[int]:
        """Take ``count`` blocks from the head of the queue, each with refcount 1."""
        if count > self._num_free:
            raise OutOfBlocksError(f"need {count} blocks, {self._num_free} free")
        taken = []
        nxt, prv, ref, hash_of = self._next, self._prev, self.ref, self._hash_of
        sentinel = self.num_blocks
        # _unlink of the head, inlined: this loop runs once per block allocated.
        block = nxt[sentinel]
        for _ in range(count):
            after = nxt[block]
            nxt[sentinel] = after
            prv[after] = sentinel
            if hash_of[block] is not None:
                self._evict(block)
            ref[block] = 1
            taken.append(block)
            block = after
        self._num_free -= count
        return taken

    def _evict(self, block: int) -> None:
        h = self._hash_of[block]
        if self._by_hash.get(h) == block:  # type: ignore[arg-type]
            del self._by_hash[h]  # type: ignore[arg-type]
        self._hash_of[block] = None
        self._tokens_of[block] = None
        self._num_cached_free -= 1
        self.evictions += 1

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
                # _append to the tail, inlined: this loop runs once per block freed.
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

    def lookup(self, block_hash: int, tokens: bytes) -> int | None:
        """The block cached under ``block_hash`` if it holds exactly ``tokens``."""
        block = self._by_hash.get(block_hash)
        if block is not None and self._tokens_of[block] == tokens:
            return block
        return None

    def acquire(self, block: int) -> None:
        """Take a reference to a cached block, pulling it off the queue if free."""
        if self.ref[block] == 0:
            self._unlink(block)
            self._num_free -= 1
            self._num_cached_free -= 1
        self.ref[block] += 1

    def register(self, block: int, block_hash: int, tokens: bytes) -> None:
        """Cache a full block under its chained hash (first writer wins)."""
        if block_hash in self._by_hash or self._hash_of[block] is not None:
            return
        self._by_hash[block_hash] = block
        self._hash_of[block] = block_hash
        self._tokens_of[block] = tokens

    def register_run(self, blocks: Sequence[int], hashes: Sequence[int], tokens: bytes,
                     first: int, stride: int) -> None:
        """:meth:`register` of ``blocks[i]`` under ``hashes[i]`` for every ``i`` from
        ``first``, block ``i`` holding ``tokens[i * stride:(i + 1) * stride]``: one call
        per allocation instead of one per block (allocation with caching on)."""
        by_hash, hash_of, tokens_of = self._by_hash, self._hash_of, self._tokens_of
        for i in range(first, len(hashes)):
            block_hash, block = hashes[i], blocks[i]
            if block_hash in by_hash or hash_of[block] is not None:
                continue  # first writer wins, exactly as register()
            by_hash[block_hash] = block
            hash_of[block] = block_hash
            tokens_of[block] = tokens[i * stride:(i + 1) * stride]

    def is_cached(self, block: int) -> bool:
        return self._hash_of[block] is not None

    def evict_all_free(self) -> int:
        """Forget the prefix cache of every free block; returns how many."""
        count = 0
        sentinel = self.num_blocks
        block = self._next[sentinel]
        while block != sentinel:
            if self._hash_of[block] is not None:
                self._evict(block)
                count += 1
            block = self._next[block]
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
        for h, block in self._by_hash.items():
            if self._hash_of[block] != h:
                raise InvariantError(f"hash index maps {h} to block {block}, which holds "
                                     f"hash {self._hash_of[block]}")
