"""The backend contract, version 2: operations return the pool, all-layer forms,
release, array operations, and how backends of another version are refused."""

from __future__ import annotations

import numpy as np
import pytest
from kv_numpy._backend import NumpyBackend

import kvcore
from kvcore import AllocationRequest, Backend, BackendCapabilities, CacheConfig, KvCacheManager
from kvcore._registry import Registry
from kvcore.errors import ApiVersionError, PoolAllocationError

from .test_registry import backend, by_name, plugin, site  # noqa: F401 - the fixture

CFG = CacheConfig(num_layers=3, num_kv_heads=2, head_dim=4, dtype="float32", block_size=4,
                  num_blocks=16, swap_blocks=8)


class CopyingBackend(NumpyBackend):
    """numpy pools treated as immutable: every change returns a new array and the old
    one is poisoned, as a JAX backend with buffer donation behaves."""

    name = "copying"
    released: list[int] = []

    def capabilities(self) -> BackendCapabilities:
        return super().capabilities().model_copy(update={"mutable_pools": False})

    @staticmethod
    def _retire(old: np.ndarray, new: np.ndarray) -> np.ndarray:
        old[...] = np.nan  # a donated buffer: whoever keeps it reads garbage
        return new

    def scatter(self, pool, slots, rows):
        return self._retire(pool, super().scatter(pool.copy(), slots, rows))

    def copy_blocks(self, pool, src, dst):
        return self._retire(pool, super().copy_blocks(pool.copy(), src, dst))

    def transfer_blocks(self, src_pool, src, dst_pool, dst):
        return self._retire(dst_pool, super().transfer_blocks(src_pool, src, dst_pool.copy(),
                                                              dst))

    def release_layer(self, pool) -> None:
        CopyingBackend.released.append(id(pool))


def _rand(rng, n):
    return rng.standard_normal((n, CFG.num_kv_heads, CFG.head_dim)).astype(np.float32)


def test_the_manager_keeps_the_pools_operations_return():
    rng = np.random.default_rng(0)
    mgr = KvCacheManager(CFG, CopyingBackend())
    h = mgr.allocate(AllocationRequest(request_id="a", num_tokens=6))
    want = {}
    for layer in range(CFG.num_layers):
        k, v = _rand(rng, 6), _rand(rng, 6)
        mgr.write(h, layer, k, v)
        want[layer] = (k, v)
    child = mgr.fork(h, "b")                       # shares the partly used last block
    slots = mgr.extend_batch([h, child], 1)        # copy-on-write: copy_blocks
    for layer in range(CFG.num_layers):
        k, v = _rand(rng, 2), _rand(rng, 2)
        mgr.write_slots(layer, slots, k, v)        # scatter
        want[layer] = (np.concatenate([want[layer][0], k[:1]]),
                       np.concatenate([want[layer][1], v[:1]]))
    mgr.swap_out("a")                              # transfer_blocks, both directions
    mgr.swap_in("a")
    for layer in range(CFG.num_layers):
        np.testing.assert_array_equal(h.key_cache(layer).native, want[layer][0])
        np.testing.assert_array_equal(h.value_cache(layer).native, want[layer][1])
        # layer_pool is the current pool, not a retired one.
        assert not np.isnan(mgr.layer_pool(layer).native).any()
    mgr.check_invariants()


def test_the_default_all_layer_forms_loop_over_the_single_layer_operations():
    be = kvcore.get_backend("numpy")
    pools = [be.allocate_layer(2, 2, 1, 2, kvcore.DType.float32, kvcore.Device("cpu"))
             for _ in range(3)]
    slots = be.index_array(np.array([3, 0]), kvcore.Device("cpu"))
    rows = [(np.full((2, 1, 2), i, np.float32), np.full((2, 1, 2), -i, np.float32))
            for i in range(3)]
    out = be.scatter_layers(pools, slots, rows)
    assert [o is p for o, p in zip(out, pools)] == [True] * 3
    assert [float(p[0, 1, 1, 0, 0]) for p in pools] == [0.0, 1.0, 2.0]
    out = be.copy_blocks_layers(pools, be.index_array(np.array([1]), kvcore.Device("cpu")),
                                be.index_array(np.array([0]), kvcore.Device("cpu")))
    assert [float(p[1, 0, 1, 0, 0]) for p in out] == [0.0, -1.0, -2.0]


def test_a_gather_takes_an_index_of_any_shape():
    be = kvcore.get_backend("numpy")
    pool = np.arange(2 * 3 * 2 * 1 * 2, dtype=np.float32).reshape(2, 3, 2, 1, 2)
    index = be.index_array(np.array([[5, 0], [2, 2]]), kvcore.Device("cpu"))
    got = be.gather(pool, 1, index)
    assert got.shape == (2, 2, 1, 2)
    np.testing.assert_array_equal(got, pool[1].reshape(6, 1, 2)[[[5, 0], [2, 2]]])


def test_an_index_array_never_aliases_the_callers_array():
    be = kvcore.get_backend("numpy")
    host = np.array([1, 2, 3])
    index = be.index_array(host, kvcore.Device("cpu"))
    host[0] = 7
    assert index.tolist() == [1, 2, 3]


def test_a_pool_that_cannot_be_allocated_is_a_typed_error_naming_the_bytes():
    cfg = CFG.model_copy(update={"num_blocks": 10**13})
    with pytest.raises(PoolAllocationError, match="2560000000000000 bytes"):
        KvCacheManager(cfg, "numpy")


def test_a_backend_for_version_1_is_unavailable_with_both_versions_and_the_migration_note(site):
    site("kvcore-v1", "0.1", {"v1": "v1_plugin"},
         {"v1_plugin": plugin("v1", "v1_backend:V1Backend", api=1),
          "v1_backend": backend("V1Backend", "v1", "api_version = 1")})
    reason = by_name(Registry().list_backends())["v1"].reason
    assert "API version 1, this kvcore provides 2" in reason
    assert "Migrating from API version 1" in reason
    with pytest.raises(ApiVersionError, match="Migrating from API version 1"):
        Registry().get_backend("v1")


def test_a_backend_class_without_an_api_version_is_refused_saying_what_to_declare():
    class Undeclared(Backend):  # abstract methods are never reached: refused first
        name = "undeclared"
        array_library = "numpy"

    reg = Registry()
    reg.register(Undeclared)  # type: ignore[type-abstract]
    with pytest.raises(ApiVersionError, match="declares no api_version; set the class "
                                              "attribute api_version = 2"):
        reg.get_backend("undeclared")


def test_capabilities_accept_open_device_types_and_refuse_malformed_ones():
    caps = BackendCapabilities(device_types=("cpu", "mps", "tpu"))
    assert caps.device_types == ("cpu", "mps", "tpu")
    with pytest.raises(ValueError, match="'Cuda!' is not a lower-case identifier"):
        BackendCapabilities(device_types=("Cuda!",))
    with pytest.raises(ValueError, match="a sequence of names, got the string 'cpu'"):
        BackendCapabilities(device_types="cpu")
