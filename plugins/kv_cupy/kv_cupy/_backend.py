"""The cupy backend: pools in CUDA device memory, one fancy-indexing expression per op.

Main pools are ``cupy.ndarray``s on ``cuda:N``.  A swap pool on ``cpu`` is a numpy
array in pinned (page-locked) host memory, so the operations below are written once
for both array modules (numpy and cupy share the indexing API) and pick the module of
the array they are given.

Every operation runs under the pool's own device (``with layer.device``): cupy
launches kernels on the *current* device, which need not be the pool's.

Transfers: GPU -> host uses ``cupy.asnumpy``, which returns once the data is on the
host, so a swap-out is complete when ``transfer_blocks`` returns.  Host -> GPU and
GPU -> GPU copies are queued on the destination device's current stream, in order
with the scatter that follows; :meth:`CupyBackend.synchronize` waits for that stream.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import cupy
import cupyx
import numpy as np

from kvcore import Backend, BackendCapabilities, Device, DType
from kvcore._array_ops import ArrayOps
from kvcore.errors import (BackendUnavailableError, DeviceMismatchError, PoolAllocationError,
                           UnsupportedError)

from ._array_ops import CupyOps
from ._handle import CupyKvCacheHandle

__all__ = ["CupyBackend"]

_NP_DTYPES = {DType.float16: np.dtype(np.float16), DType.float32: np.dtype(np.float32)}
_FROM_NP = {v: k for k, v in _NP_DTYPES.items()}
_CPU = Device("cpu")


def _device_count() -> int:
    """CUDA devices the runtime sees; raises the runtime's own error when it cannot
    (``cudaErrorInsufficientDriver``, ``cudaErrorNoDevice``, ...)."""
    return int(cupy.cuda.runtime.getDeviceCount())


def _on(array: Any) -> contextlib.AbstractContextManager[Any]:
    """Make ``array``'s GPU current (a no-op for host arrays)."""
    return array.device if isinstance(array, cupy.ndarray) else contextlib.nullcontext()


def _where(array: Any) -> Device:
    return Device("cuda", int(array.device.id)) if isinstance(array, cupy.ndarray) else _CPU


class CupyBackend(Backend):
    """Paged K/V pools as cupy arrays in CUDA device memory."""

    name = "cupy"
    array_library = "cupy"
    api_version = 2
    handle_class = CupyKvCacheHandle

    @classmethod
    def probe(cls) -> None:
        """Ask the CUDA runtime for its devices.  ``cupy.is_available()`` would only
        say ``False``; the runtime's exception says why, and that is the reason
        ``kvcore backends`` shows."""
        try:
            count = _device_count()
        except Exception as exc:  # cupy raises CUDARuntimeError (a RuntimeError)
            raise BackendUnavailableError(
                f"cupy.cuda.runtime.getDeviceCount() failed: {exc}") from exc
        if count < 1:
            raise BackendUnavailableError(
                "no CUDA device: cupy.cuda.runtime.getDeviceCount() returned 0")

    def capabilities(self) -> BackendCapabilities:
        return BackendCapabilities(
            device_types=("cuda",),
            dtypes=(DType.float16, DType.float32),
            unsupported_dtypes={DType.bfloat16: "cupy has no bfloat16 dtype"},
            swap_device_types=("cpu", "cuda"),
            dlpack=True,
            pinned_memory=True,
        )

    def default_device(self) -> Device:
        return Device("cuda", 0)

    def check_device(self, device: Device) -> None:
        """Main pools live on ``cuda:N`` with ``N`` below the device count."""
        if device.type != "cuda":
            raise UnsupportedError(f"backend 'cupy' cannot place a pool on device "
                                   f"{str(device)!r}; it supports cuda:N (cpu only as a "
                                   "swap target)")
        try:
            count = _device_count()
        except Exception as exc:  # no driver, no device: the runtime says which
            raise UnsupportedError(f"backend 'cupy' cannot place a pool on {device}: "
                                   f"cupy.cuda.runtime.getDeviceCount() failed: {exc}") from exc
        if device.index >= count:
            raise UnsupportedError(f"backend 'cupy' cannot place a pool on {device}: the "
                                   f"CUDA runtime sees {count} device(s), "
                                   f"cuda:0..cuda:{count - 1}")

    def _check_any_device(self, device: Device) -> None:
        if device.type != "cpu":  # a pinned host array: the swap pool of a GPU pool
            self.check_device(device)

    # --- pools --------------------------------------------------------------------

    def allocate_layer(self, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int, dtype: DType, device: Device, *,
                       pinned: bool = False, planes: int = 2) -> Any:
        """A zeroed ``cupy.ndarray`` on ``cuda:N``, or for a ``cpu`` swap pool a numpy
        array (in pinned memory when ``pinned``)."""
        self._check_any_device(device)
        self.check_dtype(dtype)
        shape = (planes, num_blocks, block_size, num_kv_heads, head_dim)
        np_dtype = _NP_DTYPES[dtype]
        try:
            if device.type == "cpu":
                return (cupyx.zeros_pinned(shape, np_dtype) if pinned
                        else np.zeros(shape, np_dtype))
            with cupy.cuda.Device(device.index):
                return cupy.zeros(shape, np_dtype)
        except (MemoryError, ValueError, cupy.cuda.memory.OutOfMemoryError,
                cupy.cuda.runtime.CUDARuntimeError) as exc:
            nbytes = int(np.prod(shape, dtype=object)) * np_dtype.itemsize
            raise PoolAllocationError(f"cupy could not allocate a pool of {nbytes} bytes on "
                                      f"{device} (shape {list(shape)}, {dtype.value}): "
                                      f"{exc}") from exc

    def index_array(self, indices: np.ndarray, device: Device) -> Any:
        host = np.array(indices, dtype=np.int64, copy=True)
        if device.type == "cpu":
            return host
        with cupy.cuda.Device(device.index):
            return cupy.asarray(host)

    @staticmethod
    def _flat(pool: Any) -> Any:
        # [P, blocks, block_size, H, D] -> [P, blocks * block_size, H, D], a view.
        planes, blocks, bs, heads, dim = pool.shape
        return pool.reshape(planes, blocks * bs, heads, dim)

    def scatter(self, pool: Any, slots: Any, rows: Sequence[Any]) -> Any:
        with _on(pool):
            flat = self._flat(pool)
            for plane, values in enumerate(rows):
                flat[plane, slots] = values
        return pool

    def gather(self, pool: Any, plane: int, slots: Any) -> Any:
        with _on(pool):
            return self._flat(pool)[plane].take(slots, axis=0)

    def copy_blocks(self, pool: Any, src: Any, dst: Any) -> Any:
        with _on(pool):
            # The right-hand side is a new array, so overlapping src/dst copy correctly.
            pool[:, dst] = pool[:, src]
        return pool

    def transfer_blocks(self, src_pool: Any, src: Any, dst_pool: Any, dst: Any) -> Any:
        s_dev, d_dev = _where(src_pool), _where(dst_pool)
        with _on(src_pool):
            picked = src_pool[:, src]
        if s_dev == d_dev:
            with _on(dst_pool):
                dst_pool[:, dst] = picked
            return dst_pool
        if d_dev.type == "cpu":
            dst_pool[:, dst] = cupy.asnumpy(picked)  # blocking: complete on return
            return dst_pool
        with _on(dst_pool):
            if s_dev.type == "cuda":
                # The gather ran on the source GPU's stream; finish it before another
                # device reads its result.
                src_pool.device.synchronize()
                moved = cupy.empty(picked.shape, picked.dtype)
                moved.data.copy_from_device(picked.data, picked.nbytes)
            else:
                moved = cupy.asarray(picked)
            dst_pool[:, dst] = moved
        return dst_pool

    def synchronize(self, device: Device) -> None:
        if device.is_cuda:
            cupy.cuda.Device(device.index).synchronize()

    # --- arrays -------------------------------------------------------------------

    def describe(self, array: Any) -> tuple[tuple[int, ...], DType | None, Device]:
        if not isinstance(array, (cupy.ndarray, np.ndarray)):
            raise TypeError(f"expected a cupy.ndarray, got {type(array).__name__}")
        return tuple(array.shape), _FROM_NP.get(np.dtype(array.dtype)), _where(array)

    def asarray(self, obj: Any, device: Device) -> Any:
        """``obj`` as a cupy array on ``device`` without copying: cupy arrays pass
        through, other DLPack producers on the same GPU (torch CUDA tensors, ...) go
        through ``cupy.from_dlpack``."""
        if isinstance(obj, (cupy.ndarray, np.ndarray)):
            where = _where(obj)
            if where != device:
                raise DeviceMismatchError(f"{type(obj).__module__.split('.')[0]} array is on "
                                          f"{where}, the cache is on {device}; move it to "
                                          f"{device} first")
            return obj
        if not (hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__")):
            raise TypeError(f"expected a cupy.ndarray or an array speaking DLPack "
                            f"(__dlpack__), got {type(obj).__name__}")
        dl_type, dl_id = (int(x) for x in obj.__dlpack_device__())
        where = "cpu" if dl_type == 1 else (f"cuda:{dl_id}" if dl_type == 2
                                            else f"DLPack device type {dl_type}:{dl_id}")
        if where != str(device):
            raise DeviceMismatchError(f"{type(obj).__name__} array is on {where}, the cache "
                                      f"is on {device}; move it to {device} first")
        with cupy.cuda.Device(device.index):
            return cupy.from_dlpack(obj)

    def to_numpy(self, array: Any) -> np.ndarray:
        if isinstance(array, np.ndarray):
            return np.array(array, copy=True)
        if not isinstance(array, cupy.ndarray):
            raise TypeError(f"expected a cupy.ndarray, got {type(array).__name__}")
        return cupy.asnumpy(array)

    def from_numpy(self, array: np.ndarray, dtype: DType, device: Device) -> Any:
        self._check_any_device(device)
        self.check_dtype(dtype)
        host = np.array(array, dtype=_NP_DTYPES[dtype], copy=True, order="C")
        if device.type == "cpu":
            return host
        with cupy.cuda.Device(device.index):
            return cupy.asarray(host)

    def array_ops(self) -> ArrayOps:
        return _OPS


_OPS = CupyOps(cupy)

