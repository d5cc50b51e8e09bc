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

from ._coordinator import Coordinator, GroupParts
from ._slot_mapping import FlashInferPageTable, VllmBlockTable
from ._sequence_table import SequenceRecord
from .errors import InvariantError
from .models import CacheGcStats, CacheHandleStats, CacheManagerStats, MemoryPressure

__all__ = ["check_invariants", "flashinfer_table", "vllm_table", "collect_garbage", "handle_stats", "manager_stats",
           "pressure_level", "reset_prefix_cache"]


def handle_stats(co: Coordinator, row: int) -> CacheHandleStats:
    t, c = co.tables, co.config
    held = [int(g.table.num_blocks[row] - g.table.released[row]) for g in co.groups]
    released = sum(int(g.table.released[row]) for g in co.groups)
    memory = sum(n * c.group_bytes_per_block(g.layout.index) for n, g in zip(held, co.groups))
    length = int(t.length[row])
    capacity = int(co.primary.table.num_blocks[row]) * co.block_size
    return CacheHandleStats(
        memory_bytes=memory, blocks_allocated=sum(held), blocks_released=released,
        tokens_stored=length, utilization=min(1.0, length / capacity) if capacity else 0.0,
        last_access=datetime.fromtimestamp(float(t.last_access[row]), timezone.utc))


def _used_fraction(co: Coordinator) -> float:
    if len(co.groups) == 1:
        pool = co.groups[0].pool
        return pool.num_used / pool.num_blocks
    return sum(g.pool.num_used for g in co.groups) / sum(g.pool.num_blocks for g in co.groups)


def pressure_level(co: Coordinator) -> MemoryPressure:
    c = co.config
    used = _used_fraction(co)
    if used >= c.pressure_critical:
        return MemoryPressure.critical
    if used >= c.pressure_high:
        return MemoryPressure.high
    if used >= c.pressure_medium:
        return MemoryPressure.medium
    return MemoryPressure.low


def manager_stats(co: Coordinator, seqs: Mapping[str, SequenceRecord]) -> CacheManagerStats:
    """Every group's pool summed (one group without ``layer_groups``)."""
    c, n = co.config, co.counters
    pools = [g.pool for g in co.groups]
    swap = [sg.pool for sg in co.swap.groups] if co.swap is not None else []
    swapped = sum(1 for s in seqs.values() if co.tables.swapped[s.row])
    used_bytes = sum(g.pool.num_used * c.group_bytes_per_block(g.layout.index)
                     for g in co.groups)
    total = sum(p.num_blocks for p in pools)
    used = sum(p.num_used for p in pools)
    return CacheManagerStats(
        total_blocks=total,
        free_blocks=sum(p.num_empty for p in pools),
        cached_blocks=sum(p.num_cached_free for p in pools),
        used_blocks=used,
        block_size=c.block_size,
        memory_bytes=c.total_bytes,
        used_memory_bytes=used_bytes,
        active_caches=len(seqs) - swapped,
        swapped_caches=swapped,
        swap_total_blocks=sum(p.num_blocks for p in swap),
        swap_free_blocks=sum(p.num_free for p in swap),
        prefix_cache_queries=n.queries,
        prefix_cache_hits=n.hits,
        prefix_cache_hit_rate=n.hits / n.queries if n.queries else 0.0,
        prefix_cache_query_tokens=n.query_tokens,
        prefix_cache_hit_tokens=n.hit_tokens,
        evictions=sum(p.evictions for p in pools),
        allocations=n.allocations,
        allocation_failures=n.failures,
        copy_on_write_copies=n.cow,
        window_released_blocks=n.window_releases,
        pressure=pressure_level(co),
        utilization=used / total,
        **(co.link.stats_fields() if co.link is not None else {}))


def flashinfer_table(co: Coordinator, rows: np.ndarray, g: GroupParts) -> FlashInferPageTable:
    """The rows' pages in group ``g`` in FlashInfer's CSR form."""
    return FlashInferPageTable.from_arrays(g.table.blocks[rows], g.table.num_blocks[rows],
                                           co.tables.length[rows], co.block_size)


def vllm_table(co: Coordinator, rows: np.ndarray, g: GroupParts,
               pad_value: int) -> VllmBlockTable:
    """The rows' pages in group ``g`` as vLLM's padded block table; a page a sliding
    window gave back is ``pad_value``, like the padding."""
    table = VllmBlockTable.from_arrays(g.table.blocks[rows], g.table.num_blocks[rows],
                                       co.tables.length[rows], co.block_size, pad_value)
    table.block_tables[table.block_tables < 0] = pad_value
    return table


def collect_garbage(co: Coordinator) -> CacheGcStats:
    """Drop the cache entries of every free cached block (they become empty)."""
    began = time.perf_counter()
    freed = nbytes = 0
    for g in co.groups:
        cached = g.pool.cached_free_blocks()
        g.prefix.forget(cached)
        g.pool.uncache(cached)
        freed += cached.size
        nbytes += cached.size * co.config.group_bytes_per_block(g.layout.index)
    co.epoch += 1
    return CacheGcStats(blocks_freed=int(freed), bytes_freed=int(nbytes),
                        duration_s=time.perf_counter() - began)


def reset_prefix_cache(co: Coordinator) -> int:
    """Drop every key; free cached blocks become empty.  Returns the keys dropped."""
    dropped = 0
    for g in co.groups:
        dropped += g.prefix.reset().size
        g.pool.uncache(g.pool.cached_free_blocks())
    co.epoch += 1
    return int(dropped)


def check_invariants(co: Coordinator, seqs: Mapping[str, SequenceRecord]) -> None:
    """Raise :class:`InvariantError` at the first inconsistency found."""
    t, bs = co.tables, co.block_size
    holders = [np.zeros(g.pool.num_blocks, dtype=np.int64) for g in co.groups]
    swap_holders = [np.zeros(sg.pool.num_blocks, dtype=np.int64)
                    for sg in (co.swap.groups if co.swap else [])]
    rows = set()
    for rid, seq in seqs.items():
        row = seq.row
        if not seq.valid:
            raise InvariantError(f"request {rid!r} is registered but marked invalid")
        if row in rows:
            raise InvariantError(f"request {rid!r} shares row {row} with another request")
        rows.add(row)
        length = int(t.length[row])
        for g in co.groups:
            table = g.table
            n = int(table.num_blocks[row])
            released = int(table.released[row])
            expected = -(-(length if g.token_based else int(t.encoder[row])) // bs)
            if n != expected or (table.blocks[row, n:] != -1).any():
                raise InvariantError(f"request {rid!r} has {n} blocks in layer group "
                                     f"{g.layout.index} for {expected * bs} tokens' worth")
            if (table.blocks[row, :released] != -1).any():
                raise InvariantError(f"request {rid!r} still points at blocks its sliding "
                                     "window gave back")
            blocks = table.held(row)
            if (blocks < 0).any() or np.unique(blocks).size != blocks.size:
                raise InvariantError(f"request {rid!r} holds a block twice or a missing "
                                     f"block in layer group {g.layout.index}: {blocks.tolist()}")
            limit = length if g.token_based else int(t.encoder[row])
            if (t.written[row, list(g.layout.layers)] > limit).any():
                raise InvariantError(f"request {rid!r} has more tokens written than it holds "
                                     f"({limit}) in layer group {g.layout.index}")
            if t.swapped[row]:
                if co.swap is None:
                    raise InvariantError(f"request {rid!r} is swapped out but there is no "
                                         "swap pool")
                np.add.at(swap_holders[g.layout.index], blocks, 1)
            else:
                np.add.at(holders[g.layout.index], blocks, 1)
        if t.known[row] > length or t.hashed[row] * bs > t.known[row]:
            raise InvariantError(f"request {rid!r}: {int(t.hashed[row])} blocks recorded from "
                                 f"{int(t.known[row])} known token ids of {length}")
    for g, held in zip(co.groups, holders):
        complete = g.store.filled.all(axis=1)
        if (complete != g.store.complete).any():
            block = int(np.flatnonzero(complete != g.store.complete)[0])
            raise InvariantError(f"block {block} of layer group {g.layout.index}: complete="
                                 f"{bool(g.store.complete[block])} but its layers say "
                                 f"{bool(complete[block])}")
        g.prefix.check()
        servable = g.prefix.servable(np.arange(g.pool.num_blocks))
        g.pool.check(held, servable)
        # An empty block's next owner may never record it: stale chain facts would let it
        # register, with new K/V, under its old prefix.
        stale = (g.pool.ref == 0) & ~servable & g.prefix.recorded
        if stale.any():
            raise InvariantError(f"free block {int(np.flatnonzero(stale)[0])} of layer group "
                                 f"{g.layout.index} is empty but keeps the chain facts of "
                                 "what it held")
    for sg, held in zip(co.swap.groups if co.swap else [], swap_holders):
        sg.pool.check(held, np.zeros(sg.pool.num_blocks, dtype=bool))
