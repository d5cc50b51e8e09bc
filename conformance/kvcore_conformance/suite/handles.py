"""Every method of :class:`kvcore.KvCacheHandle` on the backend's handle class, and its
errors, plus the DLPack export of what handles return."""

# The lambdas handed to expect_raises / _refused are called at once, inside the
# loop iteration that built them, so late binding of loop variables cannot bite.
# ruff: noqa: B023

from __future__ import annotations

import numpy as np

from kvcore import CacheHandleStats, KvCacheManager, PagedKvCacheHandle, TensorRef
from kvcore.errors import InvalidHandleError, LayerIndexError

from .._backends import require_dlpack
from .._clauses import (
    DLPACK,
    HANDLE_AS_ANY,
    HANDLE_CLONE,
    HANDLE_IDS,
    HANDLE_LAYER_RANGE,
    HANDLE_READ,
    HANDLE_SHAPE,
    HANDLE_STATS,
    HANDLE_VALIDITY,
    check,
    check_equal,
    expect_raises,
    fail,
)
from .._data import assert_same_bits
from ._base import ContractTests, covers
from ._harness import Harness
from .checks import settle

__all__ = ["HandleContract", "scrambled_handle"]


def scrambled_handle(h: Harness, mgr: KvCacheManager, rid: str = "scrambled") -> PagedKvCacheHandle:
    """A 4-block handle whose physical blocks are NOT in ascending order (``[2, 3, 1, 0]``
    on a fresh pool), so logical and physical order differ.  Needs 4 free blocks."""
    bs = mgr.block_size
    a = h.allocate(mgr, f"{rid}-filler-a", 2 * bs)
    b = h.allocate(mgr, rid, 2 * bs)
    rest = mgr.stats().free_blocks
    c = h.allocate(mgr, f"{rid}-filler-c", rest * bs) if rest else None
    mgr.deallocate(a)  # frees its blocks last-first: the queue now holds them reversed
    mgr.extend(b, 2 * bs)
    if c is not None:
        mgr.deallocate(c)
    blocks = list(b.block_table().physical_blocks)
    check(blocks != sorted(blocks), HANDLE_READ, "test set-up: blocks should be out of order",
          seen=blocks)
    return b


class HandleContract(ContractTests):
    """The fifteen handle methods, their errors, and DLPack export."""

    @covers(HANDLE_SHAPE)
    def test_handle_reports_the_config_shape(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        mgr = h.manager(num_layers=3, num_kv_heads=2, head_dim=8)
        handle = h.allocate(mgr, "shape", 5)
        check_equal((handle.device(), handle.num_layers(), handle.num_heads(), handle.head_dim()),
                    (h.device, 3, 2, 8), HANDLE_SHAPE, "(device, num_layers, num_heads, head_dim)")

    @covers(HANDLE_AS_ANY)
    def test_handle_class_and_as_any(self, kvcore_default_harness: Harness) -> None:
        h = kvcore_default_harness
        mgr = h.manager()
        handle = h.allocate(mgr, "cls", 2)
        cls = h.backend.handle_class
        check(isinstance(handle, cls), HANDLE_AS_ANY, "handles are the backend's handle_class",
              seen=type(handle).__name__, expected=cls.__name__)
        check(handle.as_any() is handle, HANDLE_AS_ANY, "as_any() must return the handle itself")
        check(handle.as_any(cls) is handle, HANDLE_AS_ANY, f"as_any({cls.__name__})")
        check(handle.as_any(PagedKvCacheHandle) is handle, HANDLE_AS_ANY,
              "as_any(PagedKvCacheHandle)")
        expect_raises(HANDLE_AS_ANY, TypeError, lambda: handle.as_any(int), "as_any(int)")
        expect_raises(HANDLE_AS_ANY, TypeError, lambda: handle.as_any("cls"), "as_any('cls')")

    @covers(HANDLE_READ)
    def test_reads_are_none_before_any_write(self, kvcore_default_harness: Harness) -> None:
        h = kvcore_default_harness
        mgr = h.manager()
        handle = h.allocate(mgr, "empty", 5)
        for layer in range(mgr.config.num_layers):
            seen = (handle.key_cache(layer), handle.value_cache(layer), handle.kv_cache(layer))
            check(seen == (None, None, None), HANDLE_READ,
                  f"layer {layer} before any write: (key_cache, value_cache, kv_cache)",
                  seen=seen, expected=(None, None, None))

    @covers(HANDLE_READ)
    def test_reads_return_written_tokens_in_logical_order(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        mgr = h.manager(num_blocks=6, num_layers=3)
        handle = scrambled_handle(h, mgr)
        data = h.fill(mgr, handle)
        for layer, (k, v) in data.items():
            h.expect_kv(HANDLE_READ, handle, layer, k, v, "blocks out of physical order")
            pair = handle.kv_cache(layer)
            check(isinstance(pair, tuple) and len(pair) == 2, HANDLE_READ,
                  f"kv_cache({layer}) must be a (key, value) pair", seen=pair)
            assert_same_bits(HANDLE_READ, h.host(pair[1]), v, h.dtype, f"kv_cache({layer})[1]")
        settle(mgr)

    @covers(HANDLE_LAYER_RANGE)
    def test_layer_out_of_range_raises(self, kvcore_default_harness: Harness) -> None:
        h = kvcore_default_harness
        mgr = h.manager(num_layers=2)
        handle = h.allocate(mgr, "layers", 4)
        h.fill(mgr, handle)
        for layer in (2, 3, 100, -1, -2):
            for name in ("key_cache", "value_cache", "kv_cache", "num_written"):
                expect_raises(HANDLE_LAYER_RANGE, LayerIndexError,
                              lambda: getattr(handle, name)(layer),
                              f"{name}({layer}) on a 2-layer cache")
            expect_raises(HANDLE_LAYER_RANGE, LayerIndexError,
                          lambda: h.write(mgr, handle, layer, h.kv(1), h.kv(1), start=3),
                          f"write to layer {layer} of a 2-layer cache")
        for layer in ("0", 1.0, True, None):
            expect_raises(HANDLE_LAYER_RANGE, TypeError, lambda: handle.key_cache(layer),
                          f"key_cache({layer!r})")

    @covers(HANDLE_CLONE)
    def test_clone_handle_shares_the_cache(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        mgr = h.manager()
        handle = h.allocate(mgr, "orig", 6)
        clone = handle.clone_handle()
        check(type(clone) is type(handle), HANDLE_CLONE, "clone type",
              seen=type(clone).__name__, expected=type(handle).__name__)
        check_equal(clone.cache_id(), handle.cache_id(), HANDLE_CLONE, "clone.cache_id()")
        k, v = h.kv(6), h.kv(6)
        h.write(mgr, clone, 0, k, v)
        h.expect_kv(HANDLE_CLONE, handle, 0, k, v, "written through the clone, read through "
                    "the original")
        mgr.extend(handle, 2)
        check_equal(clone.num_tokens(), 8, HANDLE_CLONE, "clone sees the original's extend")
        check_equal(mgr.stats().used_blocks, 2, HANDLE_CLONE, "a clone must not copy blocks")
        settle(mgr)

    @covers(HANDLE_IDS)
    def test_cache_ids_are_stable_and_distinct(self, kvcore_default_harness: Harness) -> None:
        h = kvcore_default_harness
        mgr = h.manager()
        a, b = h.allocate(mgr, "a", 3), h.allocate(mgr, "b", 3)
        first = a.cache_id()
        mgr.extend(a, 5)
        h.fill(mgr, a)
        check_equal(a.cache_id(), first, HANDLE_IDS, "cache_id() after extend and writes")
        check_equal(mgr.get_handle("a").cache_id(), first, HANDLE_IDS, "get_handle('a').cache_id()")
        check(a.cache_id() != b.cache_id(), HANDLE_IDS, "two caches share a cache_id",
              seen=(a.cache_id(), b.cache_id()))
        child = mgr.fork(a, "child")
        check(child.cache_id() != first, HANDLE_IDS, "a fork needs its own cache_id",
              seen=child.cache_id())

    @covers(HANDLE_VALIDITY)
    def test_deallocated_handles_are_invalid_everywhere(self, kvcore_default_harness: Harness) -> None:
        h = kvcore_default_harness
        mgr = h.manager()
        handle = h.allocate(mgr, "gone", 5)
        h.fill(mgr, handle)
        others = [handle.clone_handle(), mgr.get_handle("gone")]
        check(handle.is_valid(), HANDLE_VALIDITY, "is_valid() of a live handle", seen=False,
              expected=True)
        mgr.deallocate(handle)
        reborn = h.allocate(mgr, "gone", 5)  # the same request id, a new cache
        for i, old in enumerate([handle, *others]):
            label = ["the handle", "its clone", "get_handle()"][i]
            check(old.is_valid() is False, HANDLE_VALIDITY,
                  f"{label}.is_valid() after deallocate (and a new cache under the same id)",
                  seen=old.is_valid(), expected=False)
            for name, call in (("key_cache(0)", lambda: old.key_cache(0)),
                               ("value_cache(0)", lambda: old.value_cache(0)),
                               ("kv_cache(0)", lambda: old.kv_cache(0)),
                               ("block_table()", lambda: old.block_table()),
                               ("stats()", lambda: old.stats()),
                               ("clone_handle()", lambda: old.clone_handle()),
                               ("num_written(0)", lambda: old.num_written(0)),
                               ("write", lambda: h.write(mgr, old, 0, h.kv(1), h.kv(1))),
                               ("extend", lambda: mgr.extend(old, 1))):
                expect_raises(HANDLE_VALIDITY, InvalidHandleError, call,
                              f"{label}.{name} after deallocate")
        check(reborn.is_valid() and reborn.key_cache(0) is None, HANDLE_VALIDITY,
              "the new cache under the reused id starts empty and valid",
              seen=(reborn.is_valid(), reborn.key_cache(0)))
        settle(mgr)

    @covers(HANDLE_STATS)
    def test_handle_stats_match_the_table(self, kvcore_default_harness: Harness) -> None:
        h = kvcore_default_harness
        mgr = h.manager()
        cfg = mgr.config
        for n in (0, 1, 4, 7):
            handle = h.allocate(mgr, f"st{n}", n)
            stats = handle.stats()
            if not isinstance(stats, CacheHandleStats):
                fail(HANDLE_STATS, "stats() type", seen=type(stats).__name__,
                     expected="CacheHandleStats")
            blocks = -(-n // cfg.block_size)
            capacity = blocks * cfg.block_size
            check_equal(
                (stats.tokens_stored, stats.blocks_allocated, stats.memory_bytes,
                 stats.utilization),
                (n, blocks, blocks * cfg.bytes_per_block, n / capacity if capacity else 0.0),
                HANDLE_STATS, f"(tokens_stored, blocks_allocated, memory_bytes, utilization) "
                f"of a {n}-token cache")
            check_equal(CacheHandleStats.model_validate_json(stats.model_dump_json()), stats,
                        HANDLE_STATS, "handle stats after a JSON round trip")

    @covers(DLPACK)
    def test_reads_export_dlpack_on_the_cache_device(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        require_dlpack(h.backend, h.dtype)
        mgr = h.manager()
        handle = h.allocate(mgr, "dl", 6)
        k, v = h.kv(6), h.kv(6)
        h.write(mgr, handle, 0, k, v)
        for what, ref, want in (("key_cache(0)", handle.key_cache(0), k),
                                ("value_cache(0)", handle.value_cache(0), v)):
            check(isinstance(ref, TensorRef), DLPACK, f"{what} type", seen=type(ref).__name__)
            for obj, label in ((ref, f"TensorRef of {what}"), (ref.native, f"native of {what}")):
                check(hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"), DLPACK,
                      f"{label} has no __dlpack__ / __dlpack_device__", seen=type(obj).__name__)
                device = tuple(int(x) for x in obj.__dlpack_device__())
                check_equal(device, h.device.dlpack_device(), DLPACK,
                            f"{label}.__dlpack_device__()")
            check(ref.__dlpack__() is not None, DLPACK, f"{what}.__dlpack__() returned None")
            imported = h.backend.asarray(ref, h.device)
            assert_same_bits(DLPACK, h.host(imported), want, h.dtype,
                             f"{what} imported back through DLPack (Backend.asarray)")
            if h.device.type == "cpu" and h.dtype.value != "bfloat16":
                assert_same_bits(DLPACK, np.array(np.from_dlpack(ref), copy=True), want, h.dtype,
                                 f"numpy.from_dlpack({what})")
        pool = mgr.layer_pool(0)
        device = tuple(int(x) for x in pool.__dlpack_device__())
        check_equal(device, h.device.dlpack_device(), DLPACK, "layer_pool(0).__dlpack_device__()")
