"""The bulk operations of :class:`kvcore.Backend`, called directly, one clause each.

The manager only ever reads a sequence in logical order, writes new tokens after the
old ones and copies whole blocks of one sequence, so a backend can pass every manager
test with an operation that is right only for those shapes.  These tests call the
operations with the orders and sizes the manager never produces (blocks out of order,
slots reversed inside a block, a single row, exactly one block, the whole pool, more
than 2**16 slots), on ordinary values; the exact bit patterns are the ``bits.*``
clauses' business (:mod:`.bits`).
"""

from __future__ import annotations

import numpy as np

from kvcore import Backend, Device, DType

from .._backends import capability_skip
from .._clauses import (
    COPY_BLOCKS,
    FRESH_READS,
    GATHER_BLOCKS,
    GATHER_COPY,
    GATHER_ORDER,
    GATHER_SHAPE,
    LARGE_POOL,
    LAYER_FORMS,
    MUTABLE_POOLS,
    PINNED,
    PLANES,
    RETURNS_POOL,
    SCATTER,
    SCATTER_OVERWRITE,
    TRANSFER_BLOCKS,
    blame,
    check_equal,
)
from .._data import assert_same_bits
from ._base import ContractTests, covers
from ._harness import Harness
from ._pools import PoolModel, check_returned
from .backend_arrays import BackendArraysContract

__all__ = ["BackendOpsContract", "BulkOperationsContract", "slot_orders"]

NB, BS = 8, 4  # a small pool: 8 blocks of 4 slots
#: A pool above 2**16 slots: 4100 blocks of 16, one head of two lanes (about 1 MB).
LARGE_NB, LARGE_BS = 4100, 16


def _blocks(ids: list[int], bs: int = BS, *, reverse_inside: bool = False) -> np.ndarray:
    inside = np.arange(bs)[::-1] if reverse_inside else np.arange(bs)
    return (np.asarray(ids)[:, None] * bs + inside).reshape(-1)


def slot_orders(nb: int = NB, bs: int = BS, seed: int = 5) -> list[tuple[str, np.ndarray]]:
    """Slot orders the manager never produces, each ``(name, slots)`` without repeats."""
    whole = nb * bs
    b = 2
    return [(name, np.asarray(slots, np.int64)) for name, slots in (
        ("one row", [13]),
        ("one row, the last slot", [whole - 1]),
        ("one block in order", _blocks([b], bs)),
        ("one block reversed", _blocks([b], bs)[::-1]),
        ("one block, its first slot in place and the rest reversed",
         [b * bs, *range(b * bs + bs - 1, b * bs, -1)]),
        ("blocks [0, 2, 1, 3]", _blocks([0, 2, 1, 3], bs)),
        ("blocks [5, 1, 6, 2], slots reversed inside each",
         _blocks([5, 1, 6, 2], bs, reverse_inside=True)),
        ("blocks [6, 4], then half of block 7",
         np.concatenate([_blocks([6, 4], bs), [7 * bs, 7 * bs + 1]])),
        ("a descending run across blocks", np.arange(5 * bs + 1, bs, -1)),
        ("an ascending run starting inside a block", np.arange(bs + 1, 4 * bs + 2)),
        ("the whole pool in order", np.arange(whole)),
        ("the whole pool, blocks in reverse order", _blocks(list(range(nb))[::-1], bs)),
        ("the whole pool shuffled", np.random.default_rng(seed).permutation(whole)),
    )]


class BulkOperationsContract(ContractTests):
    """scatter, gather, copy_blocks, transfer_blocks, their all-layer forms, one-plane
    and large pools, on ordinary values, against a dense mirror."""

    @covers(RETURNS_POOL)
    def test_pool_operations_return_the_pool(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        pool = PoolModel(h, NB, BS)
        pool.fill()  # each operation's result is checked by PoolModel (check_returned)
        pool.copy_blocks([1], [6])
        other = PoolModel(h, NB, BS)
        pool.transfer_to(other, [2, 0], [5, 7])

    @covers(SCATTER)
    def test_scatter_writes_only_the_given_slots(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        for name, slots in slot_orders():
            pool = PoolModel(h, NB, BS)  # fresh zeros: every other slot must stay +0.0
            pool.scatter(slots, [pool.ordinary(len(slots)), pool.ordinary(len(slots))],
                         what=f"{name}:")

    @covers(SCATTER_OVERWRITE)
    def test_scatter_overwrites_what_was_there(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        pool = PoolModel(h, NB, BS)
        pool.fill()  # every slot written once (checked as backend.scatter)
        for name, slots in slot_orders(seed=11):
            pool.scatter(slots, [pool.ordinary(len(slots)), pool.ordinary(len(slots))],
                         clause=SCATTER_OVERWRITE, what=f"{name}, over earlier writes:")

    @covers(GATHER_ORDER)
    def test_gather_returns_rows_in_slot_order(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        pool = PoolModel(h, NB, BS)
        pool.fill()
        orders = [(name, slots) for name, slots in slot_orders(seed=3)]
        orders.append(("blocks [4, 1, 5, 0] then two slots of block 2",
                       np.concatenate([_blocks([4, 1, 5, 0]), [2 * BS, 2 * BS + 1]])))
        for name, slots in orders:
            for plane in (0, 1):
                pool.gather(plane, slots, what=name)

    @covers(GATHER_SHAPE)
    def test_gather_accepts_an_index_of_any_shape(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        pool = PoolModel(h, NB, BS)
        pool.fill()
        rng = np.random.default_rng(8)
        for slots in (rng.permutation(NB * BS)[:15].reshape(3, 5),
                      _blocks([3, 0, 6, 1]).reshape(4, BS),  # a page table of whole blocks
                      rng.permutation(NB * BS)[:16].reshape(2, 2, 4),
                      np.array([[7]]), np.arange(6).reshape(6, 1)):
            for plane in (1, 0):
                pool.gather(plane, slots, clause=GATHER_SHAPE)

    @covers(GATHER_COPY)
    def test_gather_returns_a_copy(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        be = h.backend
        pool = PoolModel(h, NB, BS)
        pool.fill()
        # One contiguous run (where returning a view is tempting), whole blocks, and a
        # scattered one.
        for order in (np.arange(4, 12), _blocks([5, 6, 7]), np.array([4, 5, 6, 7, 12])):
            index = pool.index(order)
            before = [be.gather(pool.pool, plane, index) for plane in (0, 1)]
            snapshots = [h.host(b) for b in before]
            pool.scatter(order, [pool.ordinary(len(order)), pool.ordinary(len(order))])
            for plane in (0, 1):
                assert_same_bits(GATHER_COPY, h.host(before[plane]), snapshots[plane], h.dtype,
                                 f"gather(plane={plane}, slots={order.tolist()}) after the "
                                 "pool was overwritten at those slots")

    @covers(GATHER_BLOCKS)
    def test_gather_blocks_returns_whole_blocks_in_order_as_a_copy(
            self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        be = h.backend
        if type(be).gather_blocks is Backend.gather_blocks:
            capability_skip("gather_blocks", "the backend does not provide gather_blocks; "
                            "batch reads go through gather (checked by backend.gather.*)")
        pool = PoolModel(h, NB, BS)
        pool.fill()
        rows = pool.rows_of(pool.mirror)
        for blocks in (np.array([[3, 0, 6], [1, 1, 7]]), np.array([5]), np.arange(NB)[::-1],
                       np.array([[2]]), np.zeros((2, 0), dtype=np.int64)):
            index = pool.index(blocks)
            for plane in (0, 1):
                op = f"gather_blocks(pool, plane={plane}, blocks={blocks.tolist()})"
                with blame(GATHER_BLOCKS, op):
                    out = be.gather_blocks(pool.pool, plane, index)
                    got = h.host(out)
                want = rows[plane].reshape(NB, BS, *rows.shape[2:])[blocks]
                assert_same_bits(GATHER_BLOCKS, got, want, h.dtype, op)
                if blocks.size:  # a copy: overwrite those blocks, the result stays
                    slots = (blocks.reshape(-1)[:1, None] * BS + np.arange(BS)).reshape(-1)
                    pool.scatter(slots, [pool.ordinary(BS), pool.ordinary(BS)], verify=False)
                    assert_same_bits(GATHER_BLOCKS, h.host(out), want, h.dtype,
                                     f"{op}, after the pool was overwritten there")
                    rows = pool.rows_of(pool.mirror)

    @covers(COPY_BLOCKS)
    def test_copy_blocks_copies_whole_blocks(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        pool = PoolModel(h, NB, BS)
        pool.fill()
        for src, dst in (([3], [5]), ([3, 0], [5, 1]), ([6, 1, 4], [0, 7, 2]),
                         ([0, 1, 2, 3], [7, 6, 5, 4]), ([7], [0]), ([5, 6], [1, 2])):
            pool.copy_blocks(src, dst)

    @covers(TRANSFER_BLOCKS)
    def test_transfer_blocks_round_trips_through_the_swap_device(
            self, kvcore_harness: Harness, kvcore_swap_device: Device) -> None:
        h = kvcore_harness
        pool = PoolModel(h, NB, BS)
        pool.fill()
        away = PoolModel(h, 6, BS, device=kvcore_swap_device)
        pool.transfer_to(away, [2, 0, 5], [1, 4, 0])
        pool.transfer_to(away, [7], [5])
        back = PoolModel(h, NB, BS)
        away.transfer_to(back, [1, 4, 0, 5], [3, 1, 2, 7])
        away.transfer_to(back, [2], [0])
        whole = PoolModel(h, 6, BS, device=kvcore_swap_device)
        pool.transfer_to(whole, [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0])  # the whole pool
        whole.transfer_to(back, [0, 1, 2, 3, 4, 5], [6, 4, 5, 1, 3, 2])

    @covers(LARGE_POOL)
    def test_large_pool_is_addressed_in_full(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        pool = PoolModel(h, LARGE_NB, LARGE_BS, heads=1, dim=2, clause=LARGE_POOL)
        top = pool.slots - 1  # 65599
        slots = np.array([top, top - 1, 65536, 65535, 32768, 32767, 16, 0, top - 40], np.int64)
        pool.scatter(slots, [pool.ordinary(len(slots)), pool.ordinary(len(slots))],
                     clause=LARGE_POOL, what=f"a pool of {pool.slots} slots:")
        for plane in (0, 1):
            pool.gather(plane, slots, clause=LARGE_POOL)
            pool.gather(plane, slots[::-1].reshape(3, 3), clause=LARGE_POOL)
        pool.copy_blocks([LARGE_NB - 1, 2048], [LARGE_NB - 3, LARGE_NB - 2], clause=LARGE_POOL)
        tail = np.arange(top - 2 * LARGE_BS + 1, top + 1)
        pool.gather(1, tail, clause=LARGE_POOL, what="the top two blocks")

    @covers(PLANES)
    def test_one_plane_pools(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        pool = PoolModel(h, NB, BS, planes=1)
        for name, slots in slot_orders(seed=2)[:8]:
            pool.scatter(slots, [pool.ordinary(len(slots))], clause=PLANES, what=f"{name}:")
            pool.gather(0, slots, clause=PLANES)
        pool.copy_blocks([6, 1], [3, 4], clause=PLANES)
        swap = h.backend.capabilities().swap_device_types
        other = PoolModel(h, 4, BS, planes=1, device=Device(swap[0]) if swap else None)
        pool.transfer_to(other, [3, 0, 6], [2, 0, 1], clause=PLANES)
        other.transfer_to(pool, [0, 1], [7, 5], clause=PLANES)

    @covers(LAYER_FORMS)
    def test_all_layer_forms_match_per_layer_operations(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        be = h.backend
        layers = 3
        each = [PoolModel(h, NB, BS) for _ in range(layers)]  # the per-layer reference
        once = [PoolModel(h, NB, BS) for _ in range(layers)]  # through the *_layers forms
        slots = _blocks([5, 1], reverse_inside=True)
        rows = [[m.ordinary(len(slots)), m.ordinary(len(slots))] for m in each]
        for m, r in zip(each, rows):
            m.scatter(slots, r)
        index = once[0].index(slots)
        natives = [[once[0].native(x) for x in r] for r in rows]
        self._layers_call(h, once, each, "scatter_layers",
                          lambda pools: be.scatter_layers(pools, index, natives))
        src, dst = once[0].index([5, 1]), once[0].index([0, 6])
        for m in each:
            m.copy_blocks([5, 1], [0, 6])
        self._layers_call(h, once, each, "copy_blocks_layers",
                          lambda pools: be.copy_blocks_layers(pools, src, dst))
        swap = be.capabilities().swap_device_types
        device = Device(swap[0]) if swap else h.device
        each_away = [PoolModel(h, 4, BS, device=device) for _ in range(layers)]
        once_away = [PoolModel(h, 4, BS, device=device) for _ in range(layers)]
        for m, away in zip(each, each_away):
            m.transfer_to(away, [0, 6, 1], [3, 0, 2])
        s_i, d_i = once[0].index([0, 6, 1]), once_away[0].index([3, 0, 2])
        self._layers_call(h, once_away, each_away, "transfer_blocks_layers",
                          lambda pools: be.transfer_blocks_layers([m.pool for m in once],
                                                                  s_i, pools, d_i))

    @staticmethod
    def _layers_call(h: Harness, once: list[PoolModel], each: list[PoolModel], op: str,
                     call: object) -> None:
        passed = [m.pool for m in once]
        with blame(LAYER_FORMS, f"{op} over {len(once)} layers"):
            returned = list(call(passed))  # type: ignore[operator]
            h.backend.synchronize(once[0].device)
        check_equal(len(returned), len(once), LAYER_FORMS, f"{op} must return one pool per layer")
        for layer, (m, ref, pool) in enumerate(zip(once, each, returned)):
            check_returned(h, f"{op} (layer {layer})", passed[layer], pool, m.facts)
            m.pool = pool
            m.mirror = ref.mirror.copy()
            m.verify(LAYER_FORMS, f"layer {layer} after {op}, versus the per-layer operation")

    @covers(FRESH_READS)
    def test_reads_see_every_change(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        pool = PoolModel(h, NB, BS)
        pool.fill()
        slots = np.concatenate([_blocks([3, 1]), _blocks([2])[::-1]])
        index = pool.index(slots)

        def read_again(after: str) -> None:
            for plane in (0, 1):
                pool.gather(plane, slots, index=index, clause=FRESH_READS,
                            what=f"the same index read again after {after}")
                pool.gather(plane, slots, clause=FRESH_READS,
                            what=f"an equal new index read after {after}")

        for plane in (0, 1):  # reads that a caching backend would remember
            pool.gather(plane, slots, index=index)
            pool.gather(plane, slots)
        pool.copy_blocks([5, 6], [3, 1])
        read_again("copy_blocks into the blocks read")
        source = PoolModel(h, NB, BS)
        source.fill()
        source.transfer_to(pool, [0, 7, 4], [1, 2, 3])
        read_again("transfer_blocks into the blocks read")
        pool.scatter(slots[::2], [pool.ordinary(len(slots[::2])), pool.ordinary(len(slots[::2]))])
        read_again("a scatter into half the slots read")

    @covers(MUTABLE_POOLS)
    def test_layer_pool_holds_the_latest_writes(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        mgr = h.manager(num_blocks=8)
        handle = h.allocate(mgr, "view", 6)
        view = mgr.layer_pool(0)
        k, v = h.kv(6), h.kv(6)
        h.write(mgr, handle, 0, k, v)
        slots = handle.block_table().slots()
        rows = h.host(mgr.layer_pool(0)).reshape(2, -1, h.heads, h.dim)
        assert_same_bits(MUTABLE_POOLS, rows[0, slots], k, h.dtype,
                         "layer_pool(0) called after a write, K at the written slots")
        assert_same_bits(MUTABLE_POOLS, rows[1, slots], v, h.dtype,
                         "layer_pool(0) called after a write, V at the written slots")
        if h.backend.capabilities().mutable_pools:
            rows = h.host(view).reshape(2, -1, h.heads, h.dim)
            assert_same_bits(MUTABLE_POOLS, rows[0, slots], k, h.dtype,
                             "a layer_pool(0) taken before the write (mutable_pools=True: "
                             "the pool changes in place)")

    @covers(PINNED)
    def test_pinned_host_layer_when_declared(self, kvcore_backend: Backend,
                                             kvcore_default_dtype: DType) -> None:
        if not kvcore_backend.capabilities().pinned_memory:
            capability_skip("pinned_memory", f"backend {kvcore_backend.name!r} declares "
                            "pinned_memory=False")
        h = Harness(kvcore_backend, kvcore_default_dtype, Device("cpu"))
        pool = PoolModel(h, NB, BS, device=Device("cpu"), pinned=True, clause=PINNED)
        pool.verify(PINNED, "a fresh pinned layer")
        pool.scatter([3, 17, 0], [pool.ordinary(3), pool.ordinary(3)], clause=PINNED)


class BackendOpsContract(BulkOperationsContract, BackendArraysContract):
    """Identity, capabilities, pools, array conversions and every bulk operation of the
    backend, bit-exact.  (pytest runs inherited tests base-last-first, so the arrays
    part, listed last, runs before the bulk operations.)"""
