"""Read-only views of a manager's parts: statistics, pressure, invariants; and the
two whole-cache prefix operations, gc and reset.

Functions over a :class:`~kvcore._coordinator.Coordinator`; the manager calls them
under its lock.  :func:`check_invariants` is O(pool size): for tests, not engines.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import datetime, timezone

import numpy as np

from ._coordinator import Coordinator
from ._sequence_table import SequenceRecord
from .errors import InvariantError
from .models import CacheGcStats, CacheHandleStats, CacheManagerStats, MemoryPressure

__all__ = ["check_invariants", "collect_garbage", "handle_stats", "manager_stats",
           "pressure_level", "reset_prefix_cache"]


def handle_stats(co: Coordinator, row: int) -> CacheHandleStats:
    t = co.tables
    blocks = int(t.num_blocks[row])
    length = int(t.length[row])
    capacity = blocks * co.block_size
    return CacheHandleStats(
        memory_bytes=blocks * co.config.bytes_per_block, blocks_allocated=blocks,
        tokens_stored=length, utilization=length / capacity if capacity else 0.0,
        last_access=datetime.fromtimestamp(float(t.last_access[row]), timezone.utc))


def pressure_level(co: Coordinator) -> MemoryPressure:
    c, pool = co.config, co.pool
    used = pool.num_used / pool.num_blocks
    if used >= c.pressure_critical:
        return MemoryPressure.critical
    if used >= c.pressure_high:
        return MemoryPressure.high
    if used >= c.pressure_medium:
        return MemoryPressure.medium
    return MemoryPressure.low


def manager_stats(co: Coordinator, seqs: Mapping[str, SequenceRecord]) -> CacheManagerStats:
    pool, c, n = co.pool, co.config, co.counters
    swap = co.swap.pool if co.swap is not None else None
    swapped = sum(1 for s in seqs.values() if co.tables.swapped[s.row])
    return CacheManagerStats(
        total_blocks=pool.num_blocks,
        free_blocks=pool.num_empty,
        cached_blocks=pool.num_cached_free,
        used_blocks=pool.num_used,
        block_size=c.block_size,
        memory_bytes=c.total_bytes,
        used_memory_bytes=pool.num_used * c.bytes_per_block,
        active_caches=len(seqs) - swapped,
        swapped_caches=swapped,
        swap_total_blocks=swap.num_blocks if swap else 0,
        swap_free_blocks=swap.num_free if swap else 0,
        prefix_cache_queries=n.queries,
        prefix_cache_hits=n.hits,
        prefix_cache_hit_rate=n.hits / n.queries if n.queries else 0.0,
        prefix_cache_query_tokens=n.query_tokens,
        prefix_cache_hit_tokens=n.hit_tokens,
        evictions=pool.evictions,
        allocations=n.allocations,
        allocation_failures=n.failures,
        copy_on_write_copies=n.cow,
        pressure=pressure_level(co),
        utilization=pool.num_used / pool.num_blocks)


def collect_garbage(co: Coordinator) -> CacheGcStats:
    """Drop the cache entries of every free cached block (they become empty)."""
    began = time.perf_counter()
    cached = co.pool.cached_free_blocks()
    co.index.forget(cached)
    co.pool.uncache(cached)
    co.epoch += 1
    return CacheGcStats(blocks_freed=int(cached.size),
                        bytes_freed=int(cached.size) * co.config.bytes_per_block,
                        duration_s=time.perf_counter() - began)


def reset_prefix_cache(co: Coordinator) -> int:
    """Drop every key; free cached blocks become empty.  Returns the keys dropped."""
    dropped = co.index.reset()
    co.pool.uncache(co.pool.cached_free_blocks())
    co.epoch += 1
    return int(dropped.size)


def check_invariants(co: Coordinator, seqs: Mapping[str, SequenceRecord]) -> None:
    """Raise :class:`InvariantError` at the first inconsistency found."""
    t, bs, pool = co.tables, co.block_size, co.pool
    holders = np.zeros(pool.num_blocks, dtype=np.int64)
    swap_holders = np.zeros(co.swap.pool.num_blocks if co.swap else 0, dtype=np.int64)
    rows = set()
    for rid, seq in seqs.items():
        row = seq.row
        if not seq.valid:
            raise InvariantError(f"request {rid!r} is registered but marked invalid")
        if row in rows:
            raise InvariantError(f"request {rid!r} shares row {row} with another request")
        rows.add(row)
        blocks = t.row_blocks(row)
        length = int(t.length[row])
        if np.unique(blocks).size != blocks.size:
            raise InvariantError(f"request {rid!r} holds a block twice: {blocks.tolist()}")
        if blocks.size != -(-length // bs) or (t.blocks[row, blocks.size:] != -1).any():
            raise InvariantError(f"request {rid!r} has {blocks.size} blocks for {length} "
                                 f"tokens of block size {bs}")
        if (t.written[row] > length).any():
            raise InvariantError(f"request {rid!r} has more tokens written "
                                 f"({int(t.written[row].max())}) than it holds ({length})")
        if t.known[row] > length or t.hashed[row] * bs > t.known[row]:
            raise InvariantError(f"request {rid!r}: {int(t.hashed[row])} blocks recorded from "
                                 f"{int(t.known[row])} known token ids of {length}")
        if t.swapped[row]:
            if co.swap is None:
                raise InvariantError(f"request {rid!r} is swapped out but there is no swap pool")
            np.add.at(swap_holders, blocks, 1)
        else:
            np.add.at(holders, blocks, 1)
    complete = co.store.filled.all(axis=1)
    if (complete != co.store.complete).any():
        block = int(np.flatnonzero(complete != co.store.complete)[0])
        raise InvariantError(f"block {block}: complete={bool(co.store.complete[block])} but "
                             f"its layers say {bool(complete[block])}")
    co.index.check()
    servable = co.index.servable(np.arange(pool.num_blocks))
    pool.check(holders, servable)
    # An empty block's next owner may never record it: stale chain facts would let it
    # register, with new K/V, under its old prefix.
    stale = (pool.ref == 0) & ~servable & co.index.recorded
    if stale.any():
        raise InvariantError(f"free block {int(np.flatnonzero(stale)[0])} is empty but keeps "
                             "the chain facts of what it held")
    if co.swap is not None:
        co.swap.pool.check(swap_holders, np.zeros(co.swap.pool.num_blocks, dtype=bool))
