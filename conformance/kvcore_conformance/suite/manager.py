"""The manager's core operations on the backend: allocate, extend, write, read, fork,
deallocate, and the errors each raises (with the cache left as it was)."""

# The lambdas handed to expect_raises / _refused are called at once, inside the
# loop iteration that built them, so late binding of loop variables cannot bite.
# ruff: noqa: B023

from __future__ import annotations

from typing import Any

import numpy as np

from kvcore import AllocationRequest, KvCacheManager
from kvcore.errors import (
    CapacityError,
    DtypeMismatchError,
    DuplicateRequestError,
    InvalidHandleError,
    InvariantError,
    LayerIndexError,
    OutOfBlocksError,
    ShapeMismatchError,
    UnknownRequestError,
    WriteOrderError,
)

from .._clauses import (
    ALLOCATE,
    ALLOCATE_ATOMIC,
    DEALLOCATE,
    EXTEND,
    FORK_COW,
    FRESH_POOLS,
    INVARIANTS,
    WRITE_DTYPE,
    WRITE_ERRORS,
    WRITE_READ,
    check,
    check_equal,
    expect_raises,
    fail,
)
from ._base import ContractTests, covers
from ._harness import Harness
from .checks import settle

__all__ = ["ManagerContract", "snapshot"]


def snapshot(mgr: KvCacheManager) -> dict[str, Any]:
    """What a refused operation must leave untouched: tables, lengths, counts."""
    stats = mgr.stats()
    tables = {hd.request_id: (hd.block_table().physical_blocks, hd.num_tokens(),
                              tuple(hd.num_written(i) for i in range(mgr.config.num_layers)))
              for hd in mgr.list_handles()}
    return {"tables": tables, "free": stats.free_blocks, "cached": stats.cached_blocks,
                "used": stats.used_blocks}


class ManagerContract(ContractTests):
    """Allocation, writes and reads, extension, fork and deallocation."""

    @covers(ALLOCATE)
    def test_allocate_reserves_blocks_and_can_allocate_agrees(
            self, kvcore_default_harness: Harness) -> None:
        h = kvcore_default_harness
        mgr = h.manager(num_blocks=8)
        bs = mgr.block_size
        for rid, n in (("a", 1), ("b", bs), ("c", 2 * bs + 1)):
            req_ok = mgr.can_allocate(h_req(rid, n))
            handle = h.allocate(mgr, rid, n)
            check(req_ok and isinstance(handle, h.backend.handle_class), ALLOCATE,
                  f"allocate({rid!r}, {n} tokens)", seen=(req_ok, type(handle).__name__))
        check_equal(mgr.stats().used_blocks, 1 + 1 + 3, ALLOCATE, "blocks in use")
        big = h_req("big", 3 * bs + 1)  # needs 4 blocks, 3 are free
        check(not mgr.can_allocate(big), ALLOCATE, "can_allocate of a request that cannot fit",
              seen=True, expected=False)
        before = snapshot(mgr)
        expect_raises(ALLOCATE_ATOMIC, OutOfBlocksError, lambda: mgr.allocate(big),
                      "allocate beyond the free blocks")
        expect_raises(ALLOCATE_ATOMIC, DuplicateRequestError, lambda: h.allocate(mgr, "a", 1),
                      "allocate of a live request id")
        check_equal(snapshot(mgr), before, ALLOCATE_ATOMIC, "cache after refused allocations")
        check(mgr.can_allocate(h_req("fits", 3 * bs)), ALLOCATE, "can_allocate of 3 free blocks",
              seen=False, expected=True)
        settle(mgr)

    @covers(WRITE_READ)
    def test_write_read_round_trip_across_layers_and_blocks(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        mgr = h.manager(num_layers=3)
        handle = h.allocate(mgr, "rt", 7)
        data = h.fill(mgr, handle)
        for step in range(6):  # decode: one token at a time, across block boundaries
            mgr.extend(handle, 1)
            for layer in range(3):
                k, v = h.kv(1), h.kv(1)
                h.write(mgr, handle, layer, k, v)
                data[layer] = (np.concatenate([data[layer][0], k]),
                               np.concatenate([data[layer][1], v]))
        for layer, (k, v) in data.items():
            check_equal(handle.num_written(layer), 13, WRITE_READ, f"num_written({layer})")
            h.expect_kv(WRITE_READ, handle, layer, k, v, "prefill of 7 then 6 decode steps")
        settle(mgr)

    @covers(WRITE_DTYPE)
    def test_write_of_another_dtype_raises(self, kvcore_default_harness: Harness) -> None:
        h = kvcore_default_harness
        be = h.backend
        mgr = h.manager()
        handle = h.allocate(mgr, "dt", 4)
        k, v = h.kv(4), h.kv(4)
        h.write(mgr, handle, 0, k, v)
        mgr.extend(handle, 2)
        shape = (2, h.heads, h.dim)
        wrong: list[tuple[str, Any]] = [
            (f"a {other.value} {be.name} array", be.from_numpy(np.zeros(shape, np.float32),
                                                               other, h.device))
            for other in be.capabilities().dtypes if other is not h.dtype]
        if h.device.type == "cpu":
            for np_dtype in (np.float64, np.float32, np.float16):
                if np.dtype(np_dtype) != np.dtype(h.dtype.value if h.dtype.value != "bfloat16"
                                                  else np.float32):
                    wrong.append((f"a numpy {np.dtype(np_dtype)} array", np.zeros(shape, np_dtype)))
            # Integers of the cache's width: a backend that judges dtypes by their size
            # would take int16 for float16 (whether asarray or the manager's check
            # refuses them, the write must raise DtypeMismatchError).
            for np_dtype in (np.int16, np.uint16, np.int32):
                wrong.append((f"a numpy {np.dtype(np_dtype)} array",
                              np.arange(np.prod(shape), dtype=np_dtype).reshape(shape)))
        check(bool(wrong), WRITE_DTYPE, "test set-up: no mismatched dtype to try")
        for label, arr in wrong:
            expect_raises(WRITE_DTYPE, DtypeMismatchError, lambda: mgr.write(handle, 0, arr, arr),
                          f"writing {label} into a {h.dtype.value} cache")
        check_equal(handle.num_written(0), 4, WRITE_DTYPE, "num_written after refused writes")
        h.expect_kv(WRITE_DTYPE, handle, 0, k, v, "after refused writes")

    @covers(WRITE_ERRORS)
    def test_bad_writes_raise_typed_errors_and_change_nothing(
            self, kvcore_default_harness: Harness) -> None:
        h = kvcore_default_harness
        mgr = h.manager()
        handle = h.allocate(mgr, "bad", 6)
        k, v = h.kv(4), h.kv(4)
        h.write(mgr, handle, 0, k, v, start=0)
        before = snapshot(mgr)
        native = h.native
        cases = [
            ("wrong head count", ShapeMismatchError,
             lambda: mgr.write(handle, 0, native(h.kv(2)[:, :1]), native(h.kv(2)[:, :1]))),
            ("key and value of different lengths", ShapeMismatchError,
             lambda: mgr.write(handle, 0, native(h.kv(2)), native(h.kv(1)))),
            ("a 2-d array", ShapeMismatchError,
             lambda: mgr.write(handle, 0, native(h.kv(2)[0]), native(h.kv(2)[0]))),
            ("past the sequence's length", CapacityError,
             lambda: h.write(mgr, handle, 0, h.kv(3), h.kv(3), start=4)),
            ("leaving a gap after the written tokens", WriteOrderError,
             lambda: h.write(mgr, handle, 0, h.kv(1), h.kv(1), start=5)),
            ("a negative start", CapacityError,
             lambda: h.write(mgr, handle, 0, h.kv(1), h.kv(1), start=-1)),
            ("a Python list", TypeError, lambda: mgr.write(handle, 0, [[0.0]], [[0.0]])),
            ("layer out of range", LayerIndexError,
             lambda: h.write(mgr, handle, 2, h.kv(1), h.kv(1), start=0)),
        ]
        for label, error, call in cases:
            expect_raises(WRITE_ERRORS, error, call, f"write with {label}")
            check_equal(snapshot(mgr), before, ALLOCATE_ATOMIC, f"cache after write with {label}")
        h.expect_kv(WRITE_ERRORS, handle, 0, k, v, "data after the refused writes")
        settle(mgr)

    @covers(EXTEND)
    def test_extend_batch_and_write_slots_land_in_logical_order(
            self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        mgr = h.manager(num_blocks=24)
        handles = [h.allocate(mgr, f"b{i}", n) for i, n in enumerate((3, 4, 9))]
        data = {hd.request_id: h.fill(mgr, hd) for hd in handles}
        for n in (1, 1, 3, 1, 5, 1):
            starts = [hd.num_tokens() for hd in handles]
            mapping = mgr.extend_batch(handles, n)
            want = np.concatenate([hd.block_table().slots(s, s + n)
                                   for hd, s in zip(handles, starts)])
            check_equal(mapping.slots.tolist(), want.tolist(), EXTEND,
                        f"extend_batch(n={n}) slots versus the tables' slots of the new tokens")
            for layer in range(mgr.config.num_layers):
                k, v = h.kv(len(handles) * n), h.kv(len(handles) * n)
                mgr.write_slots(layer, mapping, h.native(k), h.native(v))
                for i, hd in enumerate(handles):
                    old_k, old_v = data[hd.request_id][layer]
                    data[hd.request_id][layer] = (np.concatenate([old_k, k[i * n:(i + 1) * n]]),
                                                  np.concatenate([old_v, v[i * n:(i + 1) * n]]))
        for hd in handles:
            for layer, (k, v) in data[hd.request_id].items():
                h.expect_kv(EXTEND, hd, layer, k, v, "after extend_batch + write_slots")
        settle(mgr)

    @covers(ALLOCATE_ATOMIC)
    def test_refused_extend_changes_nothing(self, kvcore_default_harness: Harness) -> None:
        h = kvcore_default_harness
        mgr = h.manager(num_blocks=4)
        a, b = h.allocate(mgr, "a", 5), h.allocate(mgr, "b", 3)
        h.fill(mgr, a)
        before = snapshot(mgr)
        expect_raises(ALLOCATE_ATOMIC, OutOfBlocksError, lambda: mgr.extend(a, 9),
                      "extend needing 3 blocks with 1 free")
        expect_raises(ALLOCATE_ATOMIC, OutOfBlocksError, lambda: mgr.extend_batch([a, b], 5),
                      "extend_batch needing 3 blocks with 1 free")
        expect_raises(ALLOCATE_ATOMIC, ValueError, lambda: mgr.extend(a, 0), "extend(a, 0)")
        check_equal(snapshot(mgr), before, ALLOCATE_ATOMIC, "cache after refused extends")
        settle(mgr)

    @covers(FORK_COW)
    def test_fork_shares_until_written_then_copies(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        mgr = h.manager()
        parent = h.allocate(mgr, "parent", 6)  # block 2 of 2 is half full: shared on fork
        pdata = h.fill(mgr, parent)
        child = mgr.fork(parent, "child")
        check_equal(child.block_table().physical_blocks, parent.block_table().physical_blocks,
                    FORK_COW, "a fresh fork shares every block")
        check_equal(mgr.stats().used_blocks, 2, FORK_COW, "blocks in use after fork (no copy)")
        for layer, (k, v) in pdata.items():
            h.expect_kv(FORK_COW, child, layer, k, v, "child right after fork")
        cdata = {}
        mgr.extend(child, 1)  # writes into the shared half-full block: copy-on-write
        for layer, (k, v) in pdata.items():
            nk, nv = h.kv(1), h.kv(1)
            h.write(mgr, child, layer, nk, nv)
            cdata[layer] = (np.concatenate([k, nk]), np.concatenate([v, nv]))
        mgr.extend(parent, 1)
        for layer, (k, v) in pdata.items():
            nk, nv = h.kv(1), h.kv(1)
            h.write(mgr, parent, layer, nk, nv)
            pdata[layer] = (np.concatenate([k, nk]), np.concatenate([v, nv]))
        for layer in pdata:
            h.expect_kv(FORK_COW, child, layer, *cdata[layer], "child after both sides appended")
            h.expect_kv(FORK_COW, parent, layer, *pdata[layer], "parent after both sides appended")
        # Overwriting a full shared block (position 0) must copy it too.
        k0, v0 = h.kv(2), h.kv(2)
        h.write(mgr, child, 0, k0, v0, start=0)
        ck, cv = cdata[0]
        cdata[0] = (np.concatenate([k0, ck[2:]]), np.concatenate([v0, cv[2:]]))
        h.expect_kv(FORK_COW, child, 0, *cdata[0], "child after overwriting shared tokens 0..1")
        h.expect_kv(FORK_COW, parent, 0, *pdata[0], "parent after the child overwrote 0..1")
        check(mgr.stats().copy_on_write_copies >= 2, FORK_COW, "copy_on_write_copies",
              seen=mgr.stats().copy_on_write_copies, expected=">= 2")
        settle(mgr)

    @covers(INVARIANTS)
    def test_invariants_hold_through_a_workload(self, kvcore_default_harness: Harness) -> None:
        h = kvcore_default_harness
        mgr = h.manager(num_blocks=10)
        bs = mgr.block_size
        steps = [
            ("allocate with a prompt", lambda: h.fill(mgr, h.allocate(
                mgr, "a", prompt=tuple(range(2 * bs + 1))))),
            ("allocate the same prompt (prefix hit)", lambda: h.allocate(
                mgr, "b", prompt=tuple(range(2 * bs + 1)))),
            ("fork", lambda: mgr.fork("a", "a2")),
            ("extend the fork", lambda: mgr.extend("a2", bs)),
            ("copy-on-write write", lambda: h.write(mgr, "a2", 0, h.kv(1), h.kv(1),
                                                    start=2 * bs)),
            ("truncate", lambda: mgr.truncate("a2", bs + 1)),
            ("deallocate the original", lambda: mgr.deallocate("a")),
            ("deallocate the rest", lambda: [mgr.deallocate(r) for r in ("a2", "b")]),
            ("gc", mgr.gc),
        ]
        for what, step in steps:
            step()
            try:
                mgr.check_invariants()
            except InvariantError as exc:
                fail(INVARIANTS, f"check_invariants() after {what} raised: {exc}")
        stats = settle(mgr)
        check_equal((stats.free_blocks, stats.used_blocks, stats.cached_blocks),
                    (mgr.config.num_blocks, 0, 0), INVARIANTS,
                    "(free, used, cached) blocks after freeing everything and gc")

    @covers(FRESH_POOLS)
    def test_two_managers_do_not_share_pools(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        first, second = h.manager(num_blocks=6), h.manager(num_blocks=6)
        a, b = h.allocate(first, "same-id", 9), h.allocate(second, "same-id", 9)
        adata = h.fill(first, a)
        for layer in range(first.config.num_layers):
            pool = h.host(second.layer_pool(layer))
            check(not pool.any(), FRESH_POOLS, f"layer_pool({layer}) of a second manager "
                  "after the first was written must be all zeros",
                  seen=f"{int(np.count_nonzero(pool))} non-zero elements", expected=0)
        bdata = h.fill(second, b)
        for layer in range(first.config.num_layers):
            h.expect_kv(FRESH_POOLS, a, layer, *adata[layer], "the first manager's cache after "
                        "a second manager of the same shape wrote the same request id")
            h.expect_kv(FRESH_POOLS, b, layer, *bdata[layer], "the second manager's cache")

    @covers(DEALLOCATE)
    def test_deallocate_frees_blocks_once_unreferenced(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        mgr = h.manager(enable_prefix_caching=False)
        parent = h.allocate(mgr, "p", 9)
        data = h.fill(mgr, parent)
        child = mgr.fork(parent, "c")
        mgr.deallocate(parent)
        check_equal(mgr.stats().used_blocks, 3, DEALLOCATE, "blocks in use while the fork "
                    "still holds them")
        for layer, (k, v) in data.items():
            h.expect_kv(DEALLOCATE, child, layer, k, v, "fork after its parent was deallocated")
        mgr.deallocate("c")
        stats = settle(mgr)
        check_equal((stats.used_blocks, stats.free_blocks, len(mgr)),
                    (0, mgr.config.num_blocks, 0), DEALLOCATE,
                    "(used, free, live) after deallocating everything")
        expect_raises(DEALLOCATE, UnknownRequestError, lambda: mgr.deallocate("c"),
                      "deallocate of an id already deallocated")
        expect_raises(DEALLOCATE, InvalidHandleError, lambda: mgr.deallocate(child),
                      "deallocate of a handle already deallocated")


def h_req(rid: str, n: int) -> AllocationRequest:
    return AllocationRequest(request_id=rid, num_tokens=n)

