"""Prefix sharing, eviction, swapping, statistics and page-table exports on the backend."""

# The lambdas handed to expect_raises / _refused are called at once, inside the
# loop iteration that built them, so late binding of loop variables cannot bite.
# ruff: noqa: B023

from __future__ import annotations

import numpy as np

from kvcore import Device, KvCacheManager
from kvcore.errors import HandleSwappedError, OutOfBlocksError, UnsupportedError

from .._backends import capability_skip
from .._clauses import (
    ALLOCATE_ATOMIC,
    EVICTION,
    FRESH_READS,
    PAGE_TABLES,
    PREFIX_SHARING,
    STATS,
    SWAP,
    check,
    check_equal,
    expect_raises,
)
from .._data import assert_same_bits
from ._base import ContractTests, covers
from ._harness import Harness
from .checks import settle
from .handles import scrambled_handle
from .manager import snapshot

__all__ = ["PrefixSharingContract", "StatsContract", "SwapContract"]


def _prefilled(h: Harness, mgr: KvCacheManager, rid: str, prompt: tuple[int, ...],
               **extra: object) -> tuple[object, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """Allocate with a prompt and write K/V for the tokens the prefix cache did not cover."""
    handle = h.allocate(mgr, rid, prompt=prompt, **extra)
    return handle, h.fill(mgr, handle, start=handle.num_cached_tokens())


class PrefixSharingContract(ContractTests):
    """Shared prompt prefixes and the eviction of cached blocks."""

    @covers(PREFIX_SHARING)
    def test_repeated_prefix_shares_blocks_and_data(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        mgr = h.manager()
        bs = mgr.block_size
        prompt = tuple(range(100, 100 + 2 * bs + 2))  # two full blocks and a partial one
        a, adata = _prefilled(h, mgr, "a", prompt)
        b, bdata = _prefilled(h, mgr, "b", prompt)
        check_equal(b.num_cached_tokens(), 2 * bs, PREFIX_SHARING, "num_cached_tokens of the repeat")
        check_equal(b.block_table().physical_blocks[:2], a.block_table().physical_blocks[:2],
                    PREFIX_SHARING, "the repeat's first two blocks")
        for layer, (k, v) in adata.items():
            bk, bv = bdata[layer]
            h.expect_kv(PREFIX_SHARING, b, layer, np.concatenate([k[:2 * bs], bk]),
                        np.concatenate([v[:2 * bs], bv]), "cached prefix + own tail")
            h.expect_kv(PREFIX_SHARING, a, layer, k, v, "the original after the repeat wrote")
        c = h.allocate(mgr, "c", prompt=prompt, extra_key="other-adapter")
        check_equal(c.num_cached_tokens(), 0, PREFIX_SHARING, "a different extra_key must not hit")
        stats = settle(mgr)
        check(stats.prefix_cache_hits >= 2, PREFIX_SHARING, "prefix_cache_hits",
              seen=stats.prefix_cache_hits, expected=">= 2")

    @covers(EVICTION)
    def test_freed_prefix_stays_cached_until_evicted(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        mgr = h.manager(num_blocks=6)
        bs = mgr.block_size
        p1, p2 = tuple(range(10, 10 + 2 * bs)), tuple(range(50, 50 + 2 * bs))
        a, _adata = _prefilled(h, mgr, "a", p1)
        b, bdata = _prefilled(h, mgr, "b", p2)
        mgr.deallocate(a)  # p1 freed first: least recently used
        mgr.deallocate(b)
        stats = settle(mgr)
        check_equal((stats.cached_blocks, stats.used_blocks), (4, 0), EVICTION,
                    "(cached, used) blocks after freeing two cached prompts")
        filler = h.allocate(mgr, "filler", 4 * bs)  # 2 plain free + 2 evicted (p1's)
        stats = settle(mgr)
        check_equal((stats.evictions, stats.cached_blocks), (2, 2), EVICTION,
                    "(evictions, cached) after an allocation that needs two cached blocks")
        mgr.deallocate(filler)
        again2, _ = _prefilled(h, mgr, "again2", p2)
        again1 = h.allocate(mgr, "again1", prompt=p1)
        check_equal((again2.num_cached_tokens(), again1.num_cached_tokens()), (2 * bs, 0),
                    EVICTION, "(hit of the recent prefix, hit of the evicted one): LRU order")
        for layer, (k, v) in bdata.items():
            h.expect_kv(EVICTION, again2, layer, k, v, "a prefix revived from the cache")
        mgr.deallocate(again1)  # never written: nothing of it is worth caching
        mgr.deallocate(again2)
        freed = mgr.gc()
        stats = settle(mgr)
        check_equal((freed.blocks_freed, stats.cached_blocks, stats.free_blocks), (2, 0, 6),
                    EVICTION, "(gc blocks_freed, cached, free) after gc of one cached prompt "
                    "and one freed before its prefill")
        check_equal(h.allocate(mgr, "after-gc", prompt=p2).num_cached_tokens(), 0, EVICTION,
                    "a prefix dropped by gc() must not hit")


class SwapContract(ContractTests):
    """Swapping sequences out to the declared swap devices and back."""

    @covers(SWAP)
    def test_swap_round_trip_is_bit_identical(self, kvcore_harness: Harness,
                                              kvcore_swap_device: Device) -> None:
        h = kvcore_harness
        mgr = h.manager(num_blocks=6, swap_blocks=8, swap_device=kvcore_swap_device)
        handle = scrambled_handle(h, mgr, "swapped")
        data = h.fill(mgr, handle)
        tokens = handle.num_tokens()
        mgr.swap_out(handle)
        check(handle.is_swapped() and handle.is_valid(), SWAP, "(is_swapped, is_valid) after "
              "swap_out", seen=(handle.is_swapped(), handle.is_valid()), expected=(True, True))
        stats = settle(mgr)
        check_equal((stats.used_blocks, stats.swapped_caches, stats.swap_free_blocks),
                    (0, 1, 4), SWAP, "(used, swapped_caches, swap_free_blocks) after swap_out")
        for name, call in (("key_cache(0)", lambda: handle.key_cache(0)),
                           ("write", lambda: h.write(mgr, handle, 0, h.kv(1), h.kv(1))),
                           ("extend", lambda: mgr.extend(handle, 1)),
                           ("fork", lambda: mgr.fork(handle, "f"))):
            expect_raises(SWAP, HandleSwappedError, call, f"{name} while swapped out")
        other = h.allocate(mgr, "meanwhile", 5)  # the freed blocks get other data meanwhile
        h.fill(mgr, other)
        mgr.deallocate(other)
        mgr.swap_in(handle)
        check(not handle.is_swapped(), SWAP, "is_swapped() after swap_in", seen=True,
              expected=False)
        check_equal(handle.num_tokens(), tokens, SWAP, "tokens after the round trip")
        for layer, (k, v) in data.items():
            h.expect_kv(SWAP, handle, layer, k, v, f"after swap_out / swap_in via {kvcore_swap_device}")
        settle(mgr)

    @covers(FRESH_READS)
    def test_reads_after_swap_in_are_fresh(self, kvcore_harness: Harness,
                                           kvcore_swap_device: Device) -> None:
        h = kvcore_harness
        # One block in the pool: the sequence swapped back in lands exactly where
        # another one was read meanwhile, at the very same slots.
        mgr = h.manager(num_blocks=1, swap_blocks=1, swap_device=kvcore_swap_device)
        a = h.allocate(mgr, "a", 3)
        adata = h.fill(mgr, a)
        for layer, (k, v) in adata.items():
            h.expect_kv(FRESH_READS, a, layer, k, v, "before swap_out")
        mgr.swap_out(a)
        b = h.allocate(mgr, "b", 3)
        for layer, (k, v) in h.fill(mgr, b).items():
            h.expect_kv(FRESH_READS, b, layer, k, v, "another sequence in the swapped-out "
                        "sequence's block")
        mgr.deallocate(b)
        mgr.swap_in(a)
        for layer, (k, v) in adata.items():
            h.expect_kv(FRESH_READS, a, layer, k, v, "read after swap_in into the block the "
                        "other sequence was read from")

    @covers(SWAP)
    def test_swap_of_a_shared_sequence_leaves_its_fork_intact(
            self, kvcore_harness: Harness, kvcore_swap_device: Device) -> None:
        h = kvcore_harness
        mgr = h.manager(swap_blocks=8, swap_device=kvcore_swap_device)
        parent = h.allocate(mgr, "parent", 7)
        data = h.fill(mgr, parent)
        child = mgr.fork(parent, "child")
        mgr.swap_out(parent)
        for layer, (k, v) in data.items():
            h.expect_kv(SWAP, child, layer, k, v, "fork while its parent is swapped out")
        mgr.swap_in(parent)
        for layer, (k, v) in data.items():
            h.expect_kv(SWAP, parent, layer, k, v, "parent swapped back in")
        settle(mgr)

    @covers(ALLOCATE_ATOMIC)
    def test_swap_without_room_changes_nothing(self, kvcore_default_harness: Harness,
                                               kvcore_swap_device: Device) -> None:
        h = kvcore_default_harness
        mgr = h.manager(num_blocks=4, swap_blocks=1, swap_device=kvcore_swap_device)
        handle = h.allocate(mgr, "big", 6)
        data = h.fill(mgr, handle)
        before = snapshot(mgr)
        expect_raises(ALLOCATE_ATOMIC, OutOfBlocksError, lambda: mgr.swap_out(handle),
                      "swap_out of 2 blocks into a 1-block swap pool")
        check_equal(snapshot(mgr), before, ALLOCATE_ATOMIC, "cache after the refused swap_out")
        for layer, (k, v) in data.items():
            h.expect_kv(SWAP, handle, layer, k, v, "after the refused swap_out")
        settle(mgr)

    @covers(SWAP)
    def test_swap_to_an_undeclared_device_is_refused(self, kvcore_default_harness: Harness) -> None:
        h = kvcore_default_harness
        declared = h.backend.capabilities().swap_device_types
        missing = [t for t in ("cpu", "cuda") if t not in declared]
        if not missing:
            capability_skip("swap_device_types", f"backend {h.backend.name!r} declares every "
                            "swap device type: there is nothing to refuse")
        for device_type in missing:
            cfg = h.config(swap_blocks=4, swap_device=device_type)
            expect_raises(SWAP, UnsupportedError, lambda: KvCacheManager(cfg, backend=h.backend),
                          f"a swap pool on undeclared device type {device_type!r}")

    @covers(SWAP)
    def test_swap_calls_without_a_swap_pool_are_refused(self, kvcore_default_harness: Harness) -> None:
        h = kvcore_default_harness
        mgr = h.manager()
        handle = h.allocate(mgr, "noswap", 3)
        expect_raises(SWAP, UnsupportedError, lambda: mgr.swap_out(handle),
                      "swap_out on a manager without swap_blocks")


class StatsContract(ContractTests):
    """Manager statistics and the page tables handed to attention kernels."""

    @covers(STATS)
    def test_stats_agree_with_the_tables_through_a_workload(
            self, kvcore_default_harness: Harness) -> None:
        h = kvcore_default_harness
        cfg_swap = h.backend.capabilities().swap_device_types
        extra = {"swap_blocks": 8, "swap_device": cfg_swap[0]} if cfg_swap else {}
        mgr = h.manager(num_blocks=12, **extra)
        a = h.allocate(mgr, "a", prompt=tuple(range(9)))
        h.fill(mgr, a)
        settle(mgr)
        b = mgr.fork(a, "b")
        mgr.extend(b, 3)
        settle(mgr)
        h.allocate(mgr, "c", prompt=tuple(range(9)))
        settle(mgr)
        if extra:
            mgr.swap_out(a)
            settle(mgr)
        mgr.deallocate(b)
        stats = settle(mgr)
        check(isinstance(stats.pressure.value, str) and 0.0 <= stats.utilization <= 1.0, STATS,
              "(pressure, utilization)", seen=(stats.pressure, stats.utilization))
        check_equal(stats.allocations, 3, STATS, "allocations (two allocate + one fork)")

    @covers(PAGE_TABLES)
    def test_page_tables_and_layer_pool_describe_the_tables(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        mgr = h.manager(num_blocks=8)
        bs = mgr.block_size
        s = scrambled_handle(h, mgr, "s")
        short = h.allocate(mgr, "short", 1)
        handles = [s, short]
        data = {hd.request_id: h.fill(mgr, hd) for hd in handles}
        tables = [hd.block_table() for hd in handles]
        fi = mgr.flashinfer_page_table(handles)
        check_equal((fi.indptr.tolist(), fi.indices.tolist(), fi.last_page_len.tolist(), fi.page_size),
                    ([0, tables[0].num_blocks, tables[0].num_blocks + 1],
                     [*tables[0].physical_blocks, *tables[1].physical_blocks],
                     [(t.sequence_length - 1) % bs + 1 for t in tables], bs),
                    PAGE_TABLES, "flashinfer_page_table (indptr, indices, last_page_len, page_size)")
        vl = mgr.vllm_block_table(handles, pad_value=-1)
        width = tables[0].num_blocks
        check_equal((vl.block_tables.tolist(), vl.seq_lens.tolist()),
                    ([list(tables[0].physical_blocks),
                      list(tables[1].physical_blocks) + [-1] * (width - 1)],
                     [t.sequence_length for t in tables]),
                    PAGE_TABLES, "vllm_block_table (block_tables, seq_lens)")
        for layer in range(mgr.config.num_layers):
            pool = mgr.layer_pool(layer)
            cfg = mgr.config
            h.check_ref(PAGE_TABLES, pool, (2, cfg.num_blocks, bs, cfg.num_kv_heads,
                                            cfg.head_dim), f"layer_pool({layer})")
            rows = h.host(pool).reshape(2, -1, cfg.num_kv_heads, cfg.head_dim)
            for hd, table in zip(handles, tables):
                k, v = data[hd.request_id][layer]
                slots = table.slots()
                assert_same_bits(PAGE_TABLES, rows[0, slots], k, h.dtype,
                                 f"layer_pool({layer})[0] at the slots of {hd.request_id!r}")
                assert_same_bits(PAGE_TABLES, rows[1, slots], v, h.dtype,
                                 f"layer_pool({layer})[1] at the slots of {hd.request_id!r}")
        settle(mgr)

