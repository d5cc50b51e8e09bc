"""A manager's life: pools made at construction (all or nothing), released by close()
or a ``with`` block through the backend's hook, and nothing usable afterwards."""

from __future__ import annotations

import numpy as np
import pytest
from kv_numpy._backend import NumpyBackend

import kvcore
from kvcore import AllocationRequest, CacheConfig, KvCacheManager
from kvcore.errors import (InvalidHandleError, ManagerClosedError, PoolAllocationError,
                           UnsupportedError)

CFG = CacheConfig(num_layers=3, num_kv_heads=1, head_dim=2, dtype="float32", block_size=4,
                  num_blocks=8, swap_blocks=4)


class Tracking(NumpyBackend):
    """Records every pool it makes and every pool it is asked to release."""

    name = "tracking"

    def __init__(self, fail_at: int | None = None) -> None:
        self.made: list[int] = []
        self.released: list[int] = []
        self.fail_at = fail_at

    def allocate_layer(self, *args, **kwargs):
        if self.fail_at is not None and len(self.made) == self.fail_at:
            raise MemoryError("simulated: the device is full")
        pool = super().allocate_layer(*args, **kwargs)
        self.made.append(id(pool))
        return pool

    def release_layer(self, pool) -> None:
        self.released.append(id(pool))


def test_close_releases_every_pool_once_main_and_swap():
    be = Tracking()
    mgr = KvCacheManager(CFG, be)
    assert len(be.made) == 2 * CFG.num_layers  # main + swap pools
    mgr.close()
    assert sorted(be.released) == sorted(be.made)
    mgr.close()  # a second close is a no-op
    assert len(be.released) == len(be.made)
    assert mgr.closed


def test_a_with_block_closes_the_manager_even_when_it_raises():
    be = Tracking()
    with pytest.raises(RuntimeError, match="boom"):
        with KvCacheManager(CFG, be) as mgr:
            mgr.allocate(AllocationRequest(request_id="a", num_tokens=5))
            raise RuntimeError("boom")
    assert mgr.closed and sorted(be.released) == sorted(be.made)


def test_after_close_every_handle_is_invalid_and_every_call_is_refused():
    mgr = KvCacheManager(CFG, "numpy")
    h = mgr.allocate(AllocationRequest(request_id="a", num_tokens=5))
    h.write(0, np.zeros((5, 1, 2), np.float32), np.zeros((5, 1, 2), np.float32))
    slots = mgr.extend(h, 1)
    mgr.close()
    assert not h.is_valid() and h.cache_id().startswith("a#")
    for call in (h.num_tokens, lambda: h.key_cache(0), h.block_table, h.stats, h.device,
                 lambda: h.num_written(0), h.token_ids, h.clone_handle):
        with pytest.raises(InvalidHandleError, match="its manager was closed"):
            call()
    one = np.zeros((1, 1, 2), np.float32)
    for call in (lambda: mgr.allocate(AllocationRequest(request_id="b", num_tokens=1)),
                 lambda: mgr.extend_batch([h], 1), lambda: mgr.write(h, 0, one, one),
                 lambda: mgr.write_slots(0, slots, one, one), mgr.stats, mgr.gc,
                 lambda: mgr.layer_pool(0), lambda: mgr.deallocate("a"), mgr.check_invariants,
                 lambda: mgr.swap_out("a"), mgr.reset_prefix_cache, mgr.pressure):
        with pytest.raises(ManagerClosedError, match="the manager was closed"):
            call()
    assert len(mgr) == 0 and "closed" in repr(mgr)


def test_a_failed_construction_releases_the_pools_it_made():
    be = Tracking(fail_at=4)  # main pools made, the second swap pool fails
    with pytest.raises(PoolAllocationError, match="could not allocate a pool of 256 bytes "
                                                  r"per layer \(3 layers, 768 bytes in all\)"):
        KvCacheManager(CFG, be)
    assert len(be.made) == 4 and sorted(be.released) == sorted(be.made)


def test_a_device_no_backend_serves_is_refused_naming_the_backends_and_their_types():
    with pytest.raises(UnsupportedError) as info:
        KvCacheManager(CFG.model_copy(update={"device": kvcore.Device("mps")}), "numpy")
    text = str(info.value)
    assert "cannot place a pool on device 'mps:0'" in text
    assert "numpy (cpu)" in text and "torch (cpu" in text


class FailingTransfer(NumpyBackend):
    """A swap whose transfer runs out of memory half way (a GPU under pressure)."""

    name = "failing-transfer"

    def transfer_blocks_layers(self, src_pools, src, dst_pools, dst):
        raise PoolAllocationError("simulated: no room for the transfer's temporaries")


@pytest.mark.parametrize("direction", ["out", "in"])
def test_a_swap_whose_transfer_fails_changes_nothing_and_is_counted(direction):
    be = FailingTransfer() if direction == "out" else NumpyBackend()
    mgr = KvCacheManager(CFG, be)
    h = mgr.allocate(AllocationRequest(request_id="a", num_tokens=6))
    rows = np.arange(12, dtype=np.float32).reshape(6, 1, 2)
    for layer in range(CFG.num_layers):
        h.write(layer, rows, -rows)
    if direction == "in":
        mgr.swap_out(h)
        mgr._co.backend = mgr._co.swap.backend = FailingTransfer()
    before = (mgr.stats().model_dump(exclude={"allocation_failures"}), h.block_table())
    failures = mgr.stats().allocation_failures
    with pytest.raises(PoolAllocationError, match="simulated"):
        (mgr.swap_out if direction == "out" else mgr.swap_in)(h)
    assert (mgr.stats().model_dump(exclude={"allocation_failures"}), h.block_table()) == before
    assert mgr.stats().allocation_failures == failures + 1
    mgr.check_invariants()
    if direction == "out":
        np.testing.assert_array_equal(h.key_cache(2).native, rows)
