"""Read-only views of a manager: statistics, pressure, gc, invariants, page tables."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from ._block_table import BlockTable
from ._invariants import check_manager
from ._manager_state import ManagerState
from ._sequence import _Sequence
from ._slot_mapping import FlashInferPageTable, VllmBlockTable
from ._tensor_ref import TensorRef
from .models import CacheGcStats, CacheHandleStats, CacheManagerStats, MemoryPressure

if TYPE_CHECKING:
    from ._paged_handle import PagedKvCacheHandle

__all__ = ["IntrospectionMixin"]


class IntrospectionMixin(ManagerState):
    """Statistics and exports of :class:`~kvcore.KvCacheManager`."""

    def _handle_stats(self, seq: _Sequence) -> CacheHandleStats:
        with self._lock:
            self._require_live(seq, "stats")
            t = seq.table
            capacity = t.capacity
            return CacheHandleStats(
                memory_bytes=t.num_blocks * self._config.bytes_per_block,
                blocks_allocated=t.num_blocks, tokens_stored=t._length,
                utilization=t._length / capacity if capacity else 0.0,
                last_access=datetime.fromtimestamp(seq.last_access, timezone.utc))

    def _level(self) -> MemoryPressure:
        c = self._config
        used = self._pool.num_used / self._pool.num_blocks
        if used >= c.pressure_critical:
            return MemoryPressure.critical
        if used >= c.pressure_high:
            return MemoryPressure.high
        if used >= c.pressure_medium:
            return MemoryPressure.medium
        return MemoryPressure.low

    def pressure(self) -> MemoryPressure:
        """The memory-pressure level now (fraction of blocks in use)."""
        with self._lock:
            return self._level()

    def _after_change(self) -> None:
        level = self._level()
        if level is not self._pressure:
            self._pressure = level
            if self._on_pressure is not None:
                self._on_pressure(level, self.stats())

    def stats(self) -> CacheManagerStats:
        with self._lock:
            pool, c = self._pool, self._config
            swap = self._swap_pool
            return CacheManagerStats(
                total_blocks=pool.num_blocks,
                free_blocks=pool.num_free - pool.num_cached_free,
                cached_blocks=pool.num_cached_free,
                used_blocks=pool.num_used,
                block_size=c.block_size,
                memory_bytes=c.total_bytes,
                used_memory_bytes=pool.num_used * c.bytes_per_block,
                active_caches=sum(1 for s in self._seqs.values() if s.swap_blocks is None),
                swapped_caches=sum(1 for s in self._seqs.values() if s.swap_blocks is not None),
                swap_total_blocks=swap.num_blocks if swap else 0,
                swap_free_blocks=swap.num_free if swap else 0,
                prefix_cache_queries=self._queries,
                prefix_cache_hits=self._hits,
                prefix_cache_hit_rate=self._hits / self._queries if self._queries else 0.0,
                evictions=pool.evictions,
                allocations=self._allocations,
                allocation_failures=self._failures,
                copy_on_write_copies=self._cow,
                pressure=self._level(),
                utilization=pool.num_used / pool.num_blocks)

    def gc(self) -> CacheGcStats:
        """Drop the prefix cache of every block no sequence references, making them
        plain free blocks.  Blocks in use are never touched."""
        with self._lock:
            began = time.perf_counter()
            freed = self._pool.evict_all_free()
            self._after_change()
            return CacheGcStats(blocks_freed=freed, bytes_freed=freed * self._config.bytes_per_block,
                                duration_s=time.perf_counter() - began)

    def check_invariants(self) -> None:
        """Raise :class:`~kvcore.errors.InvariantError` unless the pools and tables are
        consistent: free + cached + used == total, every refcount equals the number of
        tables holding the block, no table holds a block twice, lengths fit."""
        with self._lock:
            check_manager(self._pool, self._swap_pool, self._seqs, self._written,
                          self._config.block_size)

    # --- exports ----------------------------------------------------------------------------

    def _live_tables(self, handles: Sequence[PagedKvCacheHandle | str]) -> list[BlockTable]:
        seqs = [self._seq_of(h, "page table") for h in handles]
        for seq in seqs:
            self._require_data(seq, "page table")
        return [s.table for s in seqs]

    def flashinfer_page_table(self, handles: Sequence[PagedKvCacheHandle | str]) -> FlashInferPageTable:
        """The batch's pages as FlashInfer's ``indptr`` / ``indices`` / ``last_page_len``."""
        with self._lock:
            return FlashInferPageTable.from_tables(self._live_tables(handles), self._config.block_size)

    def vllm_block_table(self, handles: Sequence[PagedKvCacheHandle | str], *,
                         pad_value: int = 0) -> VllmBlockTable:
        """The batch's pages as vLLM's padded ``block_tables`` plus ``seq_lens``."""
        with self._lock:
            return VllmBlockTable.from_tables(self._live_tables(handles), self._config.block_size,
                                              pad_value)

    def layer_pool(self, layer: int) -> TensorRef:
        """The raw pool of ``layer``: ``[2, num_blocks, block_size, heads, dim]`` (K at
        index 0, V at 1), shared with the cache, for attention kernels."""
        layer = self._check_layer(layer)
        c = self._config
        return TensorRef(self._layers[layer],
                         (2, c.num_blocks, c.block_size, c.num_kv_heads, c.head_dim),
                         c.dtype, c.device, self._backend)

