"""Planted bugs in identity, pools and array conversions: the numpy backend with one
realistic defect each (see ``broken.py`` for how they are used)."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
from kv_numpy._backend import NumpyBackend

from kvcore import Device, DType

from ._planted import FloatOnlyCapabilities, Planted


class CopyPasteNameBackend(NumpyBackend):
    """Copied from the numpy backend and registered as ``broken-name``, but still says
    ``name = "numpy"``: error messages and selection by ``backend.name`` go wrong."""

    name = "numpy"


class RecyclingPoolsBackend(NumpyBackend):
    """release_layer keeps the pool for the next allocation of its shape, which takes
    it back without zeroing it (a pool cache that forgot the memset)."""

    name = "broken-pool-reuse"

    def __init__(self) -> None:
        self._spare: dict[tuple[Any, ...], list[np.ndarray]] = {}

    def allocate_layer(self, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int, dtype: DType, device: Device, *,
                       pinned: bool = False, planes: int = 2) -> np.ndarray:
        key = (planes, num_blocks, block_size, num_kv_heads, head_dim, dtype)
        if self._spare.get(key):
            return self._spare[key].pop()
        return super().allocate_layer(num_blocks, block_size, num_kv_heads, head_dim, dtype,
                                      device, pinned=pinned, planes=planes)

    def release_layer(self, pool: np.ndarray) -> None:
        key = (*pool.shape, DType(pool.dtype.name))
        self._spare.setdefault(key, []).append(pool)


class KvOnlyReleaseBackend(NumpyBackend):
    """release_layer was written for K/V pools only and refuses one-plane pools."""

    name = "broken-release"

    def release_layer(self, pool: np.ndarray) -> None:
        if pool.shape[0] != 2:
            raise ValueError(f"not a K/V pool: shape {pool.shape}")


class WidthDescribeBackend(FloatOnlyCapabilities, NumpyBackend):
    """describe maps element sizes to dtypes (2 bytes: float16), so an int16 array
    passes for float16 and is written into the cache as numbers."""

    name = "broken-describe"

    def describe(self, array: Any) -> tuple[tuple[int, ...], DType | None, Device]:
        shape, _, device = super().describe(array)
        return shape, {2: DType.float16, 4: DType.float32}.get(array.dtype.itemsize), device


class KeepsDtypeFromNumpyBackend(FloatOnlyCapabilities, NumpyBackend):
    """from_numpy keeps any float input as it is instead of converting it."""

    name = "broken-from-numpy"

    def from_numpy(self, array: np.ndarray, dtype: DType, device: Device) -> np.ndarray:
        if np.asarray(array).dtype.kind == "f":
            return np.array(array, copy=True)
        return super().from_numpy(array, dtype, device)


class ViewToNumpyBackend(FloatOnlyCapabilities, NumpyBackend):
    """to_numpy returns the array itself: "it already is numpy"."""

    name = "broken-to-numpy"

    def to_numpy(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(array)


class AliasingIndexBackend(NumpyBackend):
    """index_array returns the caller's array when it already is int64."""

    name = "broken-index-alias"

    def index_array(self, indices: np.ndarray, device: Device) -> np.ndarray:
        return np.asarray(indices, dtype=np.int64)


class CopyingAsarrayBackend(NumpyBackend):
    """asarray copies native arrays "to be safe"."""

    name = "broken-asarray-copy"

    def asarray(self, obj: Any, device: Device) -> np.ndarray:
        return np.array(super().asarray(obj, device), copy=True)


class IntegerAcceptingAsarrayBackend(NumpyBackend):
    """asarray "helps" integer K/V by converting them to float16."""

    name = "broken-asarray-ints"

    def asarray(self, obj: Any, device: Device) -> np.ndarray:
        array = super().asarray(obj, device)
        return array.astype(np.float16) if array.dtype.kind in "iu" else array


class DeviceBlindAsarrayBackend(NumpyBackend):
    """asarray never looks at __dlpack_device__: an array on a GPU fails inside the
    import with whatever error that gives."""

    name = "broken-asarray-device"

    def asarray(self, obj: Any, device: Device) -> np.ndarray:
        if isinstance(obj, np.ndarray):
            return obj
        if not hasattr(obj, "__dlpack__"):
            raise TypeError(f"expected an array, got {type(obj).__name__}")
        try:
            return np.from_dlpack(obj)
        except (BufferError, RuntimeError, ValueError) as exc:
            raise TypeError(f"cannot import {type(obj).__name__}: {exc}") from exc


class CopyingDlpackBackend(NumpyBackend):
    """asarray copies what it imports through DLPack."""

    name = "broken-dlpack-copy"

    def asarray(self, obj: Any, device: Device) -> np.ndarray:
        array = super().asarray(obj, device)
        return array if array is obj else np.array(array, copy=True)


class ReturnsNoneBackend(NumpyBackend):
    """scatter still follows API version 1: it writes in place and returns None."""

    name = "broken-returns-none"

    def scatter(self, pool: np.ndarray, slots: np.ndarray,
                rows: Sequence[np.ndarray]) -> Any:
        super().scatter(pool, slots, rows)
        return None


class CopyOnScatterBackend(NumpyBackend):
    """Declares mutable pools but scatters into a copy and returns that (written for
    an immutable library first): a view of the old pool never sees the write."""

    name = "broken-mutable-claim"

    def scatter(self, pool: np.ndarray, slots: np.ndarray,
                rows: Sequence[np.ndarray]) -> np.ndarray:
        return super().scatter(pool.copy(), slots, rows)


class StaleGatherCacheBackend(NumpyBackend):
    """gather remembers what it read per pool and slots, and forgets only on scatter:
    copy_blocks, transfer_blocks and swap-in change the pool behind its back."""

    name = "broken-stale-cache"

    def __init__(self) -> None:
        self._cache: dict[tuple[int, int, bytes], tuple[Any, np.ndarray]] = {}

    def gather(self, pool: np.ndarray, plane: int, slots: np.ndarray) -> np.ndarray:
        key = (id(pool), plane, slots.tobytes() + str(slots.shape).encode())
        hit = self._cache.get(key)
        if hit is not None and hit[0]() is pool:
            return hit[1].copy()
        out = super().gather(pool, plane, slots)
        self._cache[key] = (weakref.ref(pool), out.copy())
        return out

    def scatter(self, pool: np.ndarray, slots: np.ndarray,
                rows: Sequence[np.ndarray]) -> np.ndarray:
        self._cache.clear()
        return super().scatter(pool, slots, rows)


ARRAY_BUGS = [
    Planted(CopyPasteNameBackend, "backend.identity", "test_registered_name_selects_this_backend",
            name="broken-name"),
    Planted(RecyclingPoolsBackend, "backend.fresh-pools", "test_pools_are_fresh_every_time"),
    Planted(KvOnlyReleaseBackend, "backend.release-layer",
            "test_release_layer_accepts_every_pool"),
    Planted(WidthDescribeBackend, "backend.describe",
            "test_describe_tells_float_from_integer_dtypes"),
    Planted(KeepsDtypeFromNumpyBackend, "backend.from-numpy",
            "test_from_numpy_converts_to_the_requested_dtype"),
    Planted(ViewToNumpyBackend, "backend.to-numpy", "test_to_numpy_returns_an_independent_copy"),
    Planted(AliasingIndexBackend, "backend.index-array",
            "test_index_array_does_not_alias_its_input"),
    Planted(CopyingAsarrayBackend, "backend.asarray",
            "test_asarray_keeps_native_arrays_and_their_dtype"),
    Planted(IntegerAcceptingAsarrayBackend, "backend.asarray",
            "test_asarray_keeps_native_arrays_and_their_dtype"),
    Planted(DeviceBlindAsarrayBackend, "backend.asarray.device",
            "test_asarray_refuses_arrays_on_another_device"),
    Planted(CopyingDlpackBackend, "backend.asarray.dlpack",
            "test_asarray_imports_dlpack_producers_without_a_copy"),
    Planted(ReturnsNoneBackend, "backend.returns-pool", "test_pool_operations_return_the_pool"),
    Planted(CopyOnScatterBackend, "capabilities.mutable-pools",
            "test_layer_pool_holds_the_latest_writes"),
    Planted(StaleGatherCacheBackend, "backend.fresh-reads", "test_reads_see_every_change"),
]
