"""The bulk operations of :class:`kvcore.Backend`, called directly, one clause each."""

# The lambdas handed to expect_raises / _refused are called at once, inside the
# loop iteration that built them, so late binding of loop variables cannot bite.
# ruff: noqa: B023

from __future__ import annotations

import numpy as np

import kvcore
from kvcore import (
    Backend,
    BackendCapabilities,
    CacheConfig,
    Device,
    DType,
    KvCacheManager,
    PagedKvCacheHandle,
)
from kvcore.errors import DeviceMismatchError, UnsupportedError

from .._backends import capability_skip
from .._clauses import (
    ALLOCATE_LAYER,
    ASARRAY,
    BACKEND_IDENTITY,
    CAPS_REFUSE_UNDECLARED,
    CAPS_WELL_FORMED,
    COPY_BLOCKS,
    DESCRIBE,
    GATHER_COPY,
    GATHER_ORDER,
    NUMPY_ROUNDTRIP,
    PINNED,
    SCATTER,
    TRANSFER_BLOCKS,
    check,
    check_equal,
    expect_raises,
)
from .._data import assert_same_bits
from ._base import ContractTests, covers
from ._harness import Harness

__all__ = ["BackendOpsContract"]

NB, BS = 6, 4  # a small pool: 6 blocks of 4 slots


def _pool_rows(h: Harness, layer: object) -> np.ndarray:
    """The layer as host ``[2, slots, heads, dim]``."""
    host = h.host(layer)
    return host.reshape(2, -1, h.heads, h.dim)


def _layer(h: Harness, device: Device | None = None) -> object:
    return h.backend.allocate_layer(NB, BS, h.heads, h.dim, h.dtype, device or h.device)


def _filled_layer(h: Harness, device: Device | None = None) -> tuple[object, np.ndarray]:
    """A layer whose every slot holds distinct data, and its host copy."""
    layer = _layer(h, device)
    n = NB * BS
    k, v = h.kv(n), h.kv(n)
    be, dev = h.backend, device or h.device
    slots = be.index_array(np.arange(n, dtype=np.int64), dev)
    layer = be.scatter(layer, slots, (be.from_numpy(k, h.dtype, dev),
                                      be.from_numpy(v, h.dtype, dev)))
    return layer, np.stack([k, v])


class BackendOpsContract(ContractTests):
    """Identity, capabilities, and every bulk operation of the backend, bit-exact."""

    @covers(BACKEND_IDENTITY)
    def test_backend_declares_identity(self, kvcore_backend: Backend) -> None:
        be = kvcore_backend
        check(isinstance(getattr(be, "name", None), str) and bool(be.name), BACKEND_IDENTITY,
              "Backend.name must be a non-empty str", seen=getattr(be, "name", None))
        check(isinstance(getattr(be, "array_library", None), str), BACKEND_IDENTITY,
              "Backend.array_library must name the library", seen=getattr(be, "array_library", None))
        check_equal(be.api_version, kvcore.KVCORE_API_VERSION, BACKEND_IDENTITY,
                    "Backend.api_version")
        cls = getattr(be, "handle_class", None)
        check(isinstance(cls, type) and issubclass(cls, PagedKvCacheHandle), BACKEND_IDENTITY,
              "Backend.handle_class must subclass kvcore.PagedKvCacheHandle", seen=cls)

    @covers(CAPS_WELL_FORMED)
    def test_capabilities_are_well_formed(self, kvcore_backend: Backend) -> None:
        caps = kvcore_backend.capabilities()
        check(isinstance(caps, BackendCapabilities), CAPS_WELL_FORMED,
              "capabilities() type", seen=type(caps).__name__, expected="BackendCapabilities")
        check(len(caps.dtypes) > 0, CAPS_WELL_FORMED, "no dtype declared", seen=caps.dtypes)
        check(len(caps.device_types) > 0 and set(caps.device_types) <= {"cpu", "cuda"},
              CAPS_WELL_FORMED, "device_types", seen=caps.device_types,
              expected="a non-empty subset of ('cpu', 'cuda')")
        both = set(caps.dtypes) & set(caps.unsupported_dtypes)
        check(not both, CAPS_WELL_FORMED, "dtypes both declared and unsupported",
              seen=sorted(d.value for d in both), expected=[])
        default = kvcore_backend.default_device()
        check(default.type in caps.device_types, CAPS_WELL_FORMED,
              "default_device() must be a declared device type", seen=str(default),
              expected=caps.device_types)

    @covers(CAPS_REFUSE_UNDECLARED)
    def test_undeclared_dtypes_and_devices_are_refused(self, kvcore_backend: Backend) -> None:
        caps = kvcore_backend.capabilities()
        missing_dtypes = [d for d in DType if d not in caps.dtypes]
        missing_devices = [t for t in ("cpu", "cuda") if t not in caps.device_types]
        if not missing_dtypes and not missing_devices:
            capability_skip("dtypes/device_types", f"backend {kvcore_backend.name!r} declares "
                            "every dtype and device type: there is nothing to refuse")
        shape = {"num_layers": 1, "num_kv_heads": 1, "head_dim": 4, "block_size": 4, "num_blocks": 2}
        for dtype in missing_dtypes:
            cfg = CacheConfig(dtype=dtype, device=kvcore_backend.default_device(), **shape)
            exc = expect_raises(CAPS_REFUSE_UNDECLARED, UnsupportedError,
                                lambda: KvCacheManager(cfg, backend=kvcore_backend),
                                f"a manager of undeclared dtype {dtype.value}")
            check(dtype.value in str(exc), CAPS_REFUSE_UNDECLARED,
                  "the error must name the dtype", seen=str(exc), expected=dtype.value)
        for device_type in missing_devices:
            cfg = CacheConfig(dtype=caps.dtypes[0], device=device_type, **shape)
            expect_raises(CAPS_REFUSE_UNDECLARED, UnsupportedError,
                          lambda: KvCacheManager(cfg, backend=kvcore_backend),
                          f"a manager on undeclared device type {device_type!r}")

    @covers(ALLOCATE_LAYER)
    def test_allocate_layer_is_zeroed_with_the_pool_layout(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        layer = _layer(h)
        shape, dtype, device = h.backend.describe(layer)
        check_equal(tuple(shape), (2, NB, BS, h.heads, h.dim), ALLOCATE_LAYER, "layer shape")
        check_equal(dtype, h.dtype, ALLOCATE_LAYER, "layer dtype")
        check_equal(device, h.device, ALLOCATE_LAYER, "layer device")
        host = h.host(layer)
        assert_same_bits(ALLOCATE_LAYER, host, np.zeros(host.shape, host.dtype), h.dtype,
                         "a fresh layer (must be all +0.0 bits)")

    @covers(NUMPY_ROUNDTRIP)
    def test_numpy_round_trip_and_describe(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        data = h.kv(7)
        arr = h.native(data)
        shape, dtype, device = h.backend.describe(arr)
        check_equal((tuple(shape), dtype, device), (data.shape, h.dtype, h.device), DESCRIBE,
                    "describe(from_numpy(x)) as (shape, dtype, device)")
        assert_same_bits(NUMPY_ROUNDTRIP, h.backend.to_numpy(arr), data, h.dtype,
                         "to_numpy(from_numpy(x))")

    @covers(ASARRAY)
    def test_asarray_keeps_native_arrays_and_their_dtype(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        be = h.backend
        data = h.kv(3)
        arr = h.native(data)
        same = be.asarray(arr, h.device)
        check_equal(be.describe(same)[1], h.dtype, ASARRAY, "asarray changed the dtype")
        assert_same_bits(ASARRAY, be.to_numpy(same), data, h.dtype, "asarray(native)")
        for other in be.capabilities().dtypes:
            if other is not h.dtype:
                foreign = be.from_numpy(np.zeros((2, h.heads, h.dim), np.float32), other, h.device)
                check_equal(be.describe(be.asarray(foreign, h.device))[1], other, ASARRAY,
                            f"asarray of a {other.value} array must keep {other.value}")
        if h.device.type == "cpu":
            wide = np.zeros((2, h.heads, h.dim), np.float64)
            try:
                seen = be.describe(be.asarray(wide, h.device))[1]
            except (TypeError, DeviceMismatchError):
                seen = None  # refusing a float64 array outright is allowed
            check(seen is None, ASARRAY, "a float64 array must not become a kvcore dtype",
                  seen=seen, expected=None)
        for junk in ([1.0, 2.0], "abc", None):
            expect_raises(ASARRAY, TypeError, lambda: be.asarray(junk, h.device),
                          f"asarray({junk!r})")

    @covers(SCATTER)
    def test_scatter_writes_only_the_given_slots(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        be = h.backend
        layer = _layer(h)
        slots = h.rng.permutation(NB * BS)[:10].astype(np.int64)
        k, v = h.kv(10), h.kv(10)
        layer = be.scatter(layer, be.index_array(slots, h.device), (h.native(k), h.native(v)))
        rows = _pool_rows(h, layer)
        want = np.zeros_like(rows)
        want[0, slots], want[1, slots] = k, v
        assert_same_bits(SCATTER, rows[0], want[0], h.dtype, f"K plane after scatter to {slots}")
        assert_same_bits(SCATTER, rows[1], want[1], h.dtype, f"V plane after scatter to {slots}")

    @covers(GATHER_ORDER)
    def test_gather_returns_rows_in_slot_order(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        be = h.backend
        layer, host = _filled_layer(h)
        rows = host.reshape(2, -1, h.heads, h.dim)
        # Descending, shuffled and block-crossing orders: a gather that sorts, or
        # walks blocks in physical order, cannot pass all three.
        whole = (np.array([4, 1, 5, 0])[:, None] * BS + np.arange(BS)).reshape(-1)
        for order in (np.arange(NB * BS)[::-1][:9], h.rng.permutation(NB * BS)[:11],
                      np.array([9, 10, 11, 20, 21, 0, 1, 2, 3]),
                      # whole blocks out of physical order, then a partial block: what
                      # reading a sequence looks like (and what block-wise fast paths see)
                      np.concatenate([whole, [2 * BS, 2 * BS + 1]])):
            order = order.astype(np.int64)
            idx = be.index_array(order, h.device)
            for kv in (0, 1):
                got = h.host(be.gather(layer, kv, idx))
                assert_same_bits(GATHER_ORDER, got, rows[kv, order], h.dtype,
                                 f"gather(layer, kv={kv}, slots={order.tolist()})")

    @covers(GATHER_COPY)
    def test_gather_returns_a_copy(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        be = h.backend
        layer, _host = _filled_layer(h)
        # One contiguous run (where returning a view is tempting) and a scattered one.
        for order in (np.arange(4, 12), np.array([4, 5, 6, 7, 12])):
            order = order.astype(np.int64)
            idx = be.index_array(order, h.device)
            before = [be.gather(layer, kv, idx) for kv in (0, 1)]
            snapshots = [h.host(b) for b in before]
            layer = be.scatter(layer, idx, (h.native(h.kv(len(order))),
                                            h.native(h.kv(len(order)))))
            for kv in (0, 1):
                assert_same_bits(GATHER_COPY, h.host(before[kv]), snapshots[kv], h.dtype,
                                 f"gather(kv={kv}, slots={order.tolist()}) after the pool was "
                                 "overwritten at those slots")

    @covers(COPY_BLOCKS)
    def test_copy_blocks_copies_whole_blocks(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        be = h.backend
        layer, host = _filled_layer(h)
        src, dst = np.array([3, 0], np.int64), np.array([5, 1], np.int64)
        layer = be.copy_blocks(layer, be.index_array(src, h.device),
                               be.index_array(dst, h.device))
        want = host.reshape(2, NB, BS, h.heads, h.dim).copy()
        want[:, dst] = want[:, src]
        got = h.host(layer)
        for kv, name in ((0, "K"), (1, "V")):
            assert_same_bits(COPY_BLOCKS, got[kv].reshape(-1, h.heads, h.dim),
                             want[kv].reshape(-1, h.heads, h.dim), h.dtype,
                             f"{name} plane (slots as rows) after copy_blocks(src={src.tolist()}, "
                             f"dst={dst.tolist()})")

    @covers(TRANSFER_BLOCKS)
    def test_transfer_blocks_round_trips_through_the_swap_device(
            self, kvcore_harness: Harness, kvcore_swap_device: Device) -> None:
        h = kvcore_harness
        be = h.backend
        layer, host = _filled_layer(h)
        away = _layer(h, kvcore_swap_device)
        src, mid = np.array([2, 0, 5], np.int64), np.array([1, 4, 0], np.int64)
        away = be.transfer_blocks(layer, be.index_array(src, h.device), away,
                                  be.index_array(mid, kvcore_swap_device))
        be.synchronize(kvcore_swap_device)
        blocks = host.reshape(2, NB, BS, h.heads, h.dim)
        want = np.zeros_like(blocks)
        want[:, mid] = blocks[:, src]
        assert_same_bits(TRANSFER_BLOCKS, h.host(away).reshape(-1, h.heads, h.dim),
                         want.reshape(-1, h.heads, h.dim), h.dtype,
                         f"swap layer on {kvcore_swap_device} (K and V planes as rows)")
        back = _layer(h)
        dst = np.array([3, 1, 2], np.int64)
        back = be.transfer_blocks(away, be.index_array(mid, kvcore_swap_device), back,
                                  be.index_array(dst, h.device))
        want2 = np.zeros_like(blocks)
        want2[:, dst] = blocks[:, src]
        assert_same_bits(TRANSFER_BLOCKS, h.host(back).reshape(-1, h.heads, h.dim),
                         want2.reshape(-1, h.heads, h.dim), h.dtype,
                         f"layer on {h.device} after the round trip")

    @covers(PINNED)
    def test_pinned_host_layer_when_declared(self, kvcore_backend: Backend,
                                             kvcore_default_dtype: DType) -> None:
        if not kvcore_backend.capabilities().pinned_memory:
            capability_skip("pinned_memory", f"backend {kvcore_backend.name!r} declares "
                            "pinned_memory=False")
        h = Harness(kvcore_backend, kvcore_default_dtype, Device("cpu"))
        layer = kvcore_backend.allocate_layer(NB, BS, h.heads, h.dim, h.dtype, Device("cpu"),
                                              pinned=True)
        shape, dtype, device = kvcore_backend.describe(layer)
        check_equal((tuple(shape), dtype, device), ((2, NB, BS, h.heads, h.dim), h.dtype,
                                                    Device("cpu")), PINNED,
                    "allocate_layer(..., pinned=True) as (shape, dtype, device)")
        host = h.host(layer)
        assert_same_bits(PINNED, host, np.zeros(host.shape, host.dtype), h.dtype,
                         "a fresh pinned layer")

