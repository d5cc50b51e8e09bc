"""Exact bit patterns through every route: the ``bits.*`` clauses.

Random data almost never holds -0.0, subnormals, the largest finite values,
infinities or NaN payloads, so a backend that computes ``x + 0`` on the way, flushes
subnormals, or canonicalises NaNs passes every other test.  Here fixed rows made only
of such values (every declared dtype, compared as bits) travel each route once, in
the order a value takes them: host conversion first, then scatter and gather, block
copies, transfers, the manager, DLPack.  A failure names the kinds of value that did
not survive (``-0.0 became +0.0``, ``signalling NaN payload 0x1 became a quiet NaN``).
"""

from __future__ import annotations

import numpy as np

from kvcore import Device

from .._backends import require_dlpack
from .._clauses import (
    BITS_COPY_BLOCKS,
    BITS_DLPACK,
    BITS_MANAGER,
    BITS_NUMPY,
    BITS_SCATTER_GATHER,
    BITS_TRANSFER,
    blame,
)
from .._data import assert_special_bits
from ._base import ContractTests, covers
from ._harness import Harness
from ._pools import PoolModel

__all__ = ["BitPatternContract"]

NB, BS = 6, 4


def _special_pool(h: Harness, clause: object = BITS_SCATTER_GATHER) -> PoolModel:
    """A pool whose every slot holds special values (K and V differ), checked."""
    pool = PoolModel(h, NB, BS)
    slots = np.random.default_rng(4).permutation(NB * BS)
    pool.scatter(slots, [h.special(NB * BS), h.special(NB * BS, shift=5)],
                 clause=clause, what="special values written to the whole pool:")  # type: ignore[arg-type]
    return pool


class BitPatternContract(ContractTests):
    """Special values come back bit for bit through every route, in every dtype."""

    @covers(BITS_NUMPY)
    def test_special_values_survive_from_and_to_numpy(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        for shift, shape in ((0, (20, h.heads, h.dim)), (3, (20, 1, 1))):
            host = h.special(shape[0], shift=shift)[:, :shape[1], :shape[2]].copy()
            with blame(BITS_NUMPY, "from_numpy / to_numpy of special values"):
                back = h.backend.to_numpy(h.native(host))
            assert_special_bits(BITS_NUMPY, back, host, h.dtype,
                                f"to_numpy(from_numpy(x)) of special values, shape {list(shape)}")

    @covers(BITS_SCATTER_GATHER)
    def test_special_values_survive_scatter_and_gather(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        pool = PoolModel(h, NB, BS)
        slots = np.concatenate([np.arange(4 * BS - 1, 3 * BS - 1, -1), [4 * BS + 1], np.arange(BS)])
        pool.scatter(slots, [h.special(len(slots)), h.special(len(slots), shift=3)],
                     clause=BITS_SCATTER_GATHER, what="special values:")
        for plane in (0, 1):
            pool.gather(plane, slots, clause=BITS_SCATTER_GATHER)
        pool = _special_pool(h)
        blocks = (np.array([4, 0, 2])[:, None] * BS + np.arange(BS)).reshape(-1)
        for plane in (0, 1):
            pool.gather(plane, np.arange(NB * BS), clause=BITS_SCATTER_GATHER,
                        what="the whole pool in order")
            pool.gather(plane, blocks, clause=BITS_SCATTER_GATHER, what="whole blocks")
            pool.gather(plane, blocks.reshape(3, BS), clause=BITS_SCATTER_GATHER,
                        what="a [blocks, block_size] index")

    @covers(BITS_COPY_BLOCKS)
    def test_special_values_survive_copy_blocks(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        pool = _special_pool(h)
        for src, dst in (([0], [5]), ([3, 1], [0, 4]), ([5, 4, 2], [1, 3, 0])):
            pool.copy_blocks(src, dst, clause=BITS_COPY_BLOCKS)

    @covers(BITS_TRANSFER)
    def test_special_values_survive_transfer_blocks(self, kvcore_harness: Harness,
                                                    kvcore_swap_device: Device) -> None:
        h = kvcore_harness
        pool = _special_pool(h)
        away = PoolModel(h, NB, BS, device=kvcore_swap_device)
        pool.transfer_to(away, list(range(NB)), list(range(NB))[::-1], clause=BITS_TRANSFER)
        back = PoolModel(h, NB, BS)
        away.transfer_to(back, [0, 2, 4, 5], [1, 5, 0, 3], clause=BITS_TRANSFER)

    @covers(BITS_MANAGER)
    def test_special_values_survive_the_manager(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        swap = h.backend.capabilities().swap_device_types
        extra = {"swap_blocks": 8, "swap_device": swap[0]} if swap else {}
        mgr = h.manager(num_blocks=8, **extra)
        n = 2 * mgr.block_size + 1
        handle = h.allocate(mgr, "special", n)
        data = {}
        for layer in range(mgr.config.num_layers):
            k, v = h.special(n, shift=layer), h.special(n, shift=layer + 7)
            h.write(mgr, handle, layer, k, v)
            data[layer] = (k, v)
            h.expect_kv(BITS_MANAGER, handle, layer, k, v, "special values written and read")
        child = mgr.fork(handle, "special-child")
        mgr.extend(child, 1)  # the shared half-full block is copied on write
        k1, v1 = h.special(1, shift=11), h.special(1, shift=13)
        h.write(mgr, child, 0, k1, v1)
        k, v = data[0]
        h.expect_kv(BITS_MANAGER, child, 0, np.concatenate([k, k1]), np.concatenate([v, v1]),
                    "the fork after copy-on-write")
        h.expect_kv(BITS_MANAGER, handle, 0, k, v, "the parent after its fork copied a block")
        if extra:
            mgr.swap_out(handle)
            mgr.swap_in(handle)
            for layer, (k, v) in data.items():
                h.expect_kv(BITS_MANAGER, handle, layer, k, v,
                            f"after swap_out / swap_in via {swap[0]}")

    @covers(BITS_DLPACK)
    def test_special_values_survive_dlpack_export(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        be = h.backend
        require_dlpack(be, h.dtype)
        mgr = h.manager(num_blocks=8)
        n = mgr.block_size + 3
        handle = h.allocate(mgr, "special-dlpack", n)
        k, v = h.special(n), h.special(n, shift=9)
        h.write(mgr, handle, 0, k, v)
        numpy_reads = h.device.type == "cpu" and h.dtype.value != "bfloat16"
        for what, ref, want in (("key_cache(0)", handle.key_cache(0), k),
                                ("value_cache(0)", handle.value_cache(0), v)):
            assert_special_bits(BITS_DLPACK, h.host(be.asarray(ref, h.device)), want, h.dtype,
                                f"{what} exported through DLPack and imported back (asarray)")
            if numpy_reads:
                assert_special_bits(BITS_DLPACK, np.array(np.from_dlpack(ref), copy=True), want,
                                    h.dtype, f"numpy.from_dlpack({what})")
        slots = handle.block_table().slots()
        pool = mgr.layer_pool(0)
        rows = h.host(be.asarray(pool, h.device)).reshape(2, -1, h.heads, h.dim)
        assert_special_bits(BITS_DLPACK, rows[0, slots], k, h.dtype,
                            "layer_pool(0) exported through DLPack: K at the written slots")
        assert_special_bits(BITS_DLPACK, rows[1, slots], v, h.dtype,
                            "layer_pool(0) exported through DLPack: V at the written slots")
        if numpy_reads:
            rows = np.array(np.from_dlpack(pool), copy=True).reshape(2, -1, h.heads, h.dim)
            assert_special_bits(BITS_DLPACK, rows[1, slots], v, h.dtype,
                                "numpy.from_dlpack(layer_pool(0)): V at the written slots")
