"""The backend's identity, declarations, pools and array conversions, called directly.

These run first: every later test builds on allocating pools and converting arrays,
so a backend broken here is told so before anything else can trip over it.
"""

# The lambdas handed to expect_raises are called at once, inside the loop iteration
# that built them, so late binding of loop variables cannot bite.
# ruff: noqa: B023

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import kvcore
from kvcore import (
    CODEC_DTYPES,
    FLOAT_DTYPES,
    AllocationRequest,
    Backend,
    BackendCapabilities,
    CacheConfig,
    Device,
    DType,
    KvCacheManager,
    PagedKvCacheHandle,
)
from kvcore.errors import (
    BackendError,
    DeviceMismatchError,
    DtypeMismatchError,
    UnsupportedError,
)

from .._backends import capability_skip, require_dlpack
from .._clauses import (
    ALLOCATE_LAYER,
    ASARRAY,
    ASARRAY_DEVICE,
    ASARRAY_DLPACK,
    BACKEND_IDENTITY,
    CAPS_REFUSE_UNDECLARED,
    CAPS_WELL_FORMED,
    DESCRIBE,
    FRESH_POOLS,
    FROM_NUMPY,
    INDEX_ARRAY,
    NUMPY_ROUNDTRIP,
    RELEASE_LAYER,
    TO_NUMPY,
    blame,
    check,
    check_equal,
    expect_raises,
    fail,
)
from .._data import assert_same_bits, host_dtype, special_bits, to_bits
from ._base import ContractTests, covers
from ._harness import Harness
from ._pools import PoolModel

__all__ = ["BackendArraysContract", "DLPackProducer"]

NB, BS = 8, 4  # a small pool: 8 blocks of 4 slots
INTEGER_DTYPES = (np.int16, np.uint16, np.int32)
CPU = Device("cpu")


class DLPackProducer:
    """An object that is nothing but a DLPack producer: it forwards ``__dlpack__`` to
    the array it wraps, so a backend can only import it through DLPack.  With
    ``device`` set it claims to live there instead, and refuses to export (a fake
    array on a GPU, no GPU needed); with ``refuse`` it refuses to export, giving that
    text as the reason."""

    def __init__(self, array: Any = None, *, device: tuple[int, int] | None = None,
                 refuse: str | None = None) -> None:
        self.array = array
        self.device = device
        self.refuse = refuse

    def __dlpack__(self, **kwargs: Any) -> Any:
        if self.refuse is not None or self.device is not None:
            raise BufferError(self.refuse or "this test producer on another device must not "
                              "be read")
        try:
            return self.array.__dlpack__(**kwargs)
        except TypeError:  # an older producer without max_version / copy / dl_device
            kwargs = {k: v for k, v in kwargs.items() if k == "stream"}
            return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        if self.device is not None:
            return self.device
        if self.array is None:
            return (1, 0)
        return tuple(self.array.__dlpack_device__())  # type: ignore[return-value]


def aligned_host(shape: tuple[int, ...], dtype: Any, fill: np.ndarray) -> np.ndarray:
    """A C-contiguous host array of ``fill``'s values on a 64-byte boundary (so a
    library that imports host memory without a copy only when it is aligned does)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    out = raw[start:start + nbytes].view(dtype).reshape(shape)
    out[...] = fill
    return out


def _registered_name(request: pytest.FixtureRequest) -> str | None:
    """The name the run selected the backend by (``--kv-backend``), if any."""
    if "kvcore_backend_name" in request.fixturenames:
        return str(request.getfixturevalue("kvcore_backend_name"))
    return None


def _exact_values(dtype: DType) -> np.ndarray:
    """The non-NaN special values of ``dtype`` as float64 (exact)."""
    bits = np.array([b for b, _ in special_bits(dtype)], np.uint64)
    with np.errstate(invalid="ignore"):  # the NaNs, dropped below
        values = _widened(bits, dtype)
    return values[~np.isnan(values)]


def _widened(bits: np.ndarray, dtype: DType) -> np.ndarray:
    if dtype is DType.float16:
        values = bits.astype(np.uint16).view(np.float16).astype(np.float64)
    elif dtype is DType.bfloat16:
        values = (bits.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)
    else:
        values = bits.astype(np.uint32).view(np.float32).astype(np.float64)
    return values


class BackendArraysContract(ContractTests):
    """Identity, capabilities, pools (allocation, freshness, release) and array
    conversions (describe, from/to numpy, index arrays, asarray, DLPack import)."""

    @covers(BACKEND_IDENTITY)
    def test_backend_declares_identity(self, kvcore_backend: Backend,
                                       kvcore_default_dtype: DType) -> None:
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
        cfg = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, block_size=4, num_blocks=2,
                          dtype=kvcore_default_dtype, device=be.default_device())
        handle = KvCacheManager(cfg, backend=be).allocate(
            AllocationRequest(request_id="identity", num_tokens=1))
        check(type(handle) is cls, BACKEND_IDENTITY, "the manager's handles must be exactly "
              "the declared handle_class", seen=type(handle).__qualname__,
              expected=getattr(cls, "__qualname__", cls))

    @covers(BACKEND_IDENTITY)
    def test_registered_name_selects_this_backend(self, kvcore_backend: Backend,
                                                  request: pytest.FixtureRequest) -> None:
        name = _registered_name(request)
        if name is None:  # the backend came from an overridden fixture: try its own name
            name = kvcore_backend.name
            try:
                kvcore.get_backend(name)
            except BackendError as exc:
                pytest.skip(f"[registration] no backend is registered under "
                            f"{type(kvcore_backend).__qualname__}.name = {name!r} ({exc}); "
                            "run the suite with --kv-backend NAME to check the registered name")
        got = kvcore.get_backend(name)
        check_equal(got.name, name, BACKEND_IDENTITY, f"kvcore.get_backend({name!r}).name "
                    "(Backend.name must be the name the backend is registered under)")
        check(type(got) is type(kvcore_backend), BACKEND_IDENTITY,
              f"kvcore.get_backend({name!r}) is not the backend under test",
              seen=type(got).__qualname__, expected=type(kvcore_backend).__qualname__)

    @covers(CAPS_WELL_FORMED)
    def test_capabilities_are_well_formed(self, kvcore_backend: Backend) -> None:
        caps = kvcore_backend.capabilities()
        check(isinstance(caps, BackendCapabilities), CAPS_WELL_FORMED,
              "capabilities() type", seen=type(caps).__name__, expected="BackendCapabilities")
        check(len(caps.dtypes) > 0, CAPS_WELL_FORMED, "no dtype declared", seen=caps.dtypes)
        check(len(caps.device_types) > 0, CAPS_WELL_FORMED, "no device type declared",
              seen=caps.device_types)
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
        # Float dtypes not declared, and codecs not served: each is a cache dtype a
        # config may name (uint8 is a storage type only, never a config's dtype).
        missing_dtypes = ([d for d in FLOAT_DTYPES if d not in caps.dtypes]
                          + [d for d in CODEC_DTYPES if d not in caps.codecs])
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
        for planes in (2, 1):
            pool = PoolModel(kvcore_harness, NB, BS, planes=planes)
            pool.verify(ALLOCATE_LAYER, f"a fresh pool of {planes} plane(s) (must be all "
                        "+0.0 bits)")

    @covers(FRESH_POOLS)
    def test_pools_are_fresh_every_time(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        for planes in (2, 1):
            first = PoolModel(h, NB, BS, planes=planes)
            first.fill()
            with blame(RELEASE_LAYER, "release_layer of a written pool"):
                h.backend.release_layer(first.pool)
            del first
            again = PoolModel(h, NB, BS, planes=planes)
            again.verify(FRESH_POOLS, "a pool allocated after one of the same shape was "
                         "written and released (must be all +0.0 bits)")
            before = PoolModel(h, NB, BS, planes=planes)
            again.fill()
            after = PoolModel(h, NB, BS, planes=planes)
            before.verify(FRESH_POOLS, "a pool allocated before another pool was written")
            after.verify(FRESH_POOLS, "a pool allocated after another pool was written")
            again.verify(FRESH_POOLS, "a written pool after two more were allocated")

    @covers(RELEASE_LAYER)
    def test_release_layer_accepts_every_pool(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        caps = h.backend.capabilities()
        keep = PoolModel(h, NB, BS)
        keep.fill()
        made = [PoolModel(h, NB, BS, planes=planes) for planes in (2, 1)]
        made[0].scatter([3, 9], [made[0].ordinary(2), made[0].ordinary(2)])  # a returned pool
        for kind in caps.swap_device_types:
            made.append(PoolModel(h, 3, BS, device=Device(kind)))
        if caps.pinned_memory:
            made.append(PoolModel(h, 3, BS, device=CPU, pinned=True))
        for pool in made:
            with blame(RELEASE_LAYER, f"release_layer({pool})"):
                h.backend.release_layer(pool.pool)
        keep.verify(RELEASE_LAYER, "a pool that was not released, after others were")

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

    @covers(DESCRIBE)
    def test_describe_tells_float_from_integer_dtypes(self, kvcore_backend: Backend) -> None:
        be = kvcore_backend
        if "cpu" not in be.capabilities().device_types:
            capability_skip("device_types", f"backend {be.name!r} declares no cpu pools; "
                            "integer arrays are made with numpy, on the cpu")
        described = 0
        for np_dtype in INTEGER_DTYPES:
            host = np.arange(24, dtype=np_dtype).reshape(2, 3, 4)
            try:
                native = be.asarray(host, CPU)
            except Exception:  # noqa: BLE001, S112  (refusing is asarray's business: its test)
                continue
            seen = str(getattr(native, "dtype", ""))
            check(not any(f in seen for f in ("float", "half")), ASARRAY,
                  f"asarray turned a numpy {np.dtype(np_dtype)} array into {seen}",
                  seen=seen, expected=f"{np.dtype(np_dtype)} kept, or DtypeMismatchError")
            shape, dtype, device = be.describe(native)
            check_equal((tuple(shape), dtype, device), ((2, 3, 4), None, CPU), DESCRIBE,
                        f"describe(asarray(numpy {np.dtype(np_dtype)} array)): kvcore has no "
                        "integer dtype, so the dtype is None")
            described += 1
        if not described:
            pytest.skip(f"[asarray] backend {be.name!r} refuses int16, uint16 and int32 arrays "
                        "outright, so there is no integer array to describe")

    @covers(FROM_NUMPY)
    def test_from_numpy_converts_to_the_requested_dtype(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        be = h.backend
        values = _exact_values(h.dtype)
        want = host_dtype(h.dtype)
        for source in (np.float64, np.float32, np.float16):
            if np.dtype(source) == want and h.dtype is not DType.bfloat16:
                continue  # the plain round trip, checked by backend.numpy-roundtrip
            with np.errstate(over="ignore"):  # the largest values overflow narrow sources
                cast = values.astype(source)
            exact = (cast.astype(np.float64) == values) & (np.signbit(cast) == np.signbit(values))
            host = cast[exact].reshape(-1, 1, 1)
            arr = be.from_numpy(host, h.dtype, h.device)
            check_equal(be.describe(arr)[1], h.dtype, FROM_NUMPY,
                        f"dtype of from_numpy(<numpy {np.dtype(source)}>, {h.dtype.value})")
            assert_same_bits(FROM_NUMPY, be.to_numpy(arr), values[exact].astype(want)
                             .reshape(-1, 1, 1), h.dtype,
                             f"from_numpy of numpy {np.dtype(source)} values exactly "
                             f"representable in {h.dtype.value}")
            nan = be.to_numpy(be.from_numpy(np.full((1, 1, 1), np.nan, source), h.dtype,
                                            h.device))
            check(bool(np.isnan(nan).all()), FROM_NUMPY, f"a numpy {np.dtype(source)} NaN "
                  f"converted to {h.dtype.value}", seen=nan.reshape(-1).tolist(), expected="NaN")
        data = h.kv(5)
        source_copy = data.copy()
        arr = h.native(data)
        data[...] = h.kv(5)
        assert_same_bits(FROM_NUMPY, be.to_numpy(arr), source_copy, h.dtype,
                         "from_numpy(x) after x was overwritten (the result must not alias x)")

    @covers(TO_NUMPY)
    def test_to_numpy_returns_an_independent_copy(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        pool = PoolModel(h, NB, BS)
        pool.scatter(np.arange(0, NB * BS, 2), [pool.ordinary(NB * BS // 2)] * 2)
        snapshot = pool.host()
        check_equal(getattr(snapshot, "dtype", None), host_dtype(h.dtype), TO_NUMPY,
                    f"to_numpy of a {h.dtype.value} pool")
        kept = snapshot.copy()
        pool.scatter([5, 7, 9, 31], [pool.ordinary(4), pool.ordinary(4)])  # unwritten slots
        check(np.array_equal(to_bits(snapshot), to_bits(kept)), TO_NUMPY,
              "an array to_numpy returned changed when the pool was written afterwards "
              "(to_numpy must copy, not return a view)")
        second = pool.host()
        if second.flags.writeable:
            second[...] = 0
            pool.verify(TO_NUMPY, "the pool after the array to_numpy returned was zeroed")

    @covers(INDEX_ARRAY)
    def test_index_array_does_not_alias_its_input(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        slots = np.array([5, 17, 2, 30, 11], np.int64)
        rows = [h.kv(5), h.kv(5)]
        plain = PoolModel(h, NB, BS)
        plain.scatter(slots, rows)  # the scatter itself works (backend.scatter)
        tested = PoolModel(h, NB, BS)
        index = tested.index(slots)
        original = slots.copy()
        slots[...] = np.arange(5)  # the caller reuses its array
        tested.scatter(original, rows, index=index, clause=INDEX_ARRAY,
                       what=f"index_array({original.tolist()}) whose numpy array was then "
                       "overwritten with [0, 1, 2, 3, 4], used in")
        for shape in ((3, 5), (2, 2, 4), (1, 1)):
            with blame(INDEX_ARRAY, f"index_array of an int64 array of shape {list(shape)}"):
                tested.index(np.arange(int(np.prod(shape))).reshape(shape))

    @covers(ASARRAY)
    def test_asarray_keeps_native_arrays_and_their_dtype(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        be = h.backend
        data = h.kv(3)
        arr = h.native(data)
        same = be.asarray(arr, h.device)
        check(same is arr, ASARRAY, "asarray of the backend's own array must return that very "
              "object (no copy, no wrapper)", seen=f"{type(same).__name__} at {id(same):#x}",
              expected=f"the array passed in, at {id(arr):#x}")
        assert_same_bits(ASARRAY, be.to_numpy(same), data, h.dtype, "asarray(native)")
        for other in be.capabilities().dtypes:
            if other is not h.dtype:
                foreign = be.from_numpy(np.zeros((2, h.heads, h.dim), np.float32), other, h.device)
                check_equal(be.describe(be.asarray(foreign, h.device))[1], other, ASARRAY,
                            f"asarray of a {other.value} array must keep {other.value}")
        if h.device.type == "cpu":
            self._integer_and_wide_arrays(be, h.device)
        for junk in ([1.0, 2.0], "abc", None, 3.5):
            expect_raises(ASARRAY, TypeError, lambda: be.asarray(junk, h.device),
                          f"asarray({junk!r})")

    @staticmethod
    def _integer_and_wide_arrays(be: Backend, device: Device) -> None:
        for np_dtype in (np.float64, *INTEGER_DTYPES):
            name = str(np.dtype(np_dtype))
            host = np.arange(12, dtype=np_dtype).reshape(2, 2, 3)
            try:
                native = be.asarray(host, device)
            except DtypeMismatchError as exc:  # refused outright: allowed, naming the dtype
                check(name in str(exc), ASARRAY, f"the DtypeMismatchError for a numpy {name} "
                      "array must name the dtype", seen=str(exc), expected=name)
                continue
            except Exception as exc:  # noqa: BLE001
                fail(ASARRAY, f"asarray of a numpy {name} array raised {type(exc).__name__}: "
                     f"{exc}", expected=f"the array as {name}, or DtypeMismatchError")
            seen = str(getattr(native, "dtype", ""))
            check(not seen or name in seen, ASARRAY, f"asarray changed a numpy {name} array's "
                  "dtype", seen=seen, expected=name)
            check(be.describe(native)[1] is None, DESCRIBE, f"describe(asarray(numpy {name} "
                  "array)): not a kvcore dtype", seen=be.describe(native)[1], expected=None)

    @covers(ASARRAY_DLPACK)
    def test_asarray_imports_dlpack_producers_without_a_copy(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        be = h.backend
        require_dlpack(be, h.dtype)
        refused = DLPackProducer(device=h.device.dlpack_device(),
                                 refuse="the test producer refuses to export")
        exc = expect_raises(ASARRAY_DLPACK, TypeError, lambda: be.asarray(refused, h.device),
                            "asarray of a DLPack producer whose export fails")
        check("refuses to export" in str(exc), ASARRAY_DLPACK, "the TypeError must give the "
              "producer's reason", seen=str(exc), expected="... the test producer refuses to export")
        if not be.capabilities().shares_imports:
            capability_skip("shares_imports", f"backend {be.name!r} declares shares_imports="
                            "False: it copies foreign arrays on import")
        if h.device.type == "cpu" and h.dtype is not DType.bfloat16:
            first, second = h.kv(4), h.kv(4)
            host = aligned_host(first.shape, first.dtype, first)
            imported = be.asarray(DLPackProducer(host), h.device)
            host[...] = second  # written after the import: shared memory shows it
            assert_same_bits(ASARRAY_DLPACK, be.to_numpy(imported), second, h.dtype,
                             "asarray(DLPack producer of host memory) after that memory was "
                             "written (asarray copied instead of sharing)")
            return
        if not be.capabilities().mutable_pools:
            capability_skip("mutable_pools", f"backend {be.name!r} declares mutable_pools="
                            f"False: on {h.device} sharing is observed by writing a pool in "
                            "place, which it does not do")
        pool = PoolModel(h, NB, BS)
        imported = be.asarray(DLPackProducer(pool.pool), h.device)
        pool.fill()  # in place (mutable pools)
        got = be.to_numpy(imported)
        assert_same_bits(ASARRAY_DLPACK, got.reshape(-1, h.heads, h.dim),
                         pool.mirror.reshape(-1, h.heads, h.dim), h.dtype,
                         "asarray(DLPack producer of a pool) after the pool was written "
                         "(asarray copied instead of sharing)")

    @covers(ASARRAY_DEVICE)
    def test_asarray_refuses_arrays_on_another_device(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        be = h.backend
        if not be.capabilities().dlpack:
            capability_skip("dlpack", f"backend {be.name!r} declares dlpack=False (the device "
                            "of a foreign array is judged by __dlpack_device__)")
        other = (2, 0) if h.device.type == "cpu" else (1, 0)  # kDLCUDA or kDLCPU
        fake = DLPackProducer(device=other)
        exc = expect_raises(ASARRAY_DEVICE, DeviceMismatchError, lambda: be.asarray(fake, h.device),
                            f"asarray of an array whose __dlpack_device__() is {other}, for a "
                            f"cache on {h.device}")
        names = [str(Device.from_dlpack(*other)), str(h.device)]
        check(all(n in str(exc) for n in names), ASARRAY_DEVICE,
              "the DeviceMismatchError must name both devices", seen=str(exc), expected=names)
        if h.device.type == "cpu" and h.dtype is not DType.bfloat16:
            check(be.asarray(DLPackProducer(aligned_host((1, 1, 2), host_dtype(h.dtype), 0)),
                             h.device) is not None, ASARRAY_DEVICE,
                  "asarray of a producer on the right device returned None")

