"""Checks shared by the contract classes: pool invariants seen from outside and inside."""

from __future__ import annotations

from kvcore import CacheManagerStats, KvCacheManager
from kvcore.errors import InvariantError

from .._clauses import INVARIANTS, STATS, check_equal, fail

__all__ = ["check_stats", "settle"]


def check_stats(mgr: KvCacheManager) -> CacheManagerStats:
    """Stats are valid, survive JSON, and agree with the live block tables."""
    stats = mgr.stats()
    if not isinstance(stats, CacheManagerStats):
        fail(STATS, "stats() type", seen=type(stats).__name__, expected="CacheManagerStats")
    check_equal(CacheManagerStats.model_validate_json(stats.model_dump_json()), stats, STATS,
                "stats after a JSON round trip")
    held: set[int] = set()
    active = swapped = 0
    for handle in mgr.list_handles():
        if handle.is_swapped():
            swapped += 1
            continue
        active += 1
        held.update(handle.block_table().physical_blocks)
    cfg = mgr.config
    check_equal(
        {"used": stats.used_blocks, "parts": stats.free_blocks + stats.cached_blocks
             + stats.used_blocks, "active": stats.active_caches, "swapped": stats.swapped_caches,
             "used_bytes": stats.used_memory_bytes, "bytes": stats.memory_bytes,
             "block_size": stats.block_size},
        {"used": len(held), "parts": cfg.num_blocks, "active": active, "swapped": swapped,
             "used_bytes": len(held) * cfg.bytes_per_block, "bytes": cfg.total_bytes,
             "block_size": cfg.block_size},
        STATS, "stats versus the blocks the live tables hold (used == distinct blocks held)")
    return stats


def settle(mgr: KvCacheManager) -> CacheManagerStats:
    """After an operation: internal invariants hold and stats agree with the tables."""
    try:
        mgr.check_invariants()
    except InvariantError as exc:
        fail(INVARIANTS, f"check_invariants() raised: {exc}")
    return check_stats(mgr)
