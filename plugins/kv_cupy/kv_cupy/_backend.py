"""The cupy backend: pools in CUDA device memory, one fancy-indexing expression per op.

Main pools are ``cupy.ndarray``s on ``cuda:N``.  A swap pool on ``cpu`` is a numpy
array in pinned (page-locked) host memory of exactly its size, so the operations below
are written once for both array modules (numpy and cupy share the indexing API) and
pick the module of the array they are given.

Guarantees (``docs/backends.md`` says what of this is verified on which hardware):

* **Device.**  Every operation runs under the pool's own device (``with pool.device``):
  cupy launches kernels on the *current* device, which need not be the pool's.
* **Streams.**  Work is enqueued on the current stream of the pool's device, after
  this backend's previous operation on the same pool even when that ran on another
  stream (a GPU-side ``wait_event``, never a host wait).  K/V passed in must be ready
  on that stream.
* **No hidden host sync.**  Indices go to the GPU with ``cupy.asarray(...,
  blocking=False)``, which CuPy stages through its pinned memory pool (it falls back
  to a blocking copy, with a ``PerformanceWarning``, only when no pinned memory is left).
* **Swap** moves blocks in chunks (``transfer_chunk_bytes``, 64 MiB by default), so the
  GPU never holds more than two chunks of temporaries, asynchronously through pinned
  memory: straight into or out of the pinned swap pool when the host blocks are
  consecutive, else through two pinned staging buffers.  Host-side landings are
  deferred to :meth:`CupyBackend.synchronize` (the manager calls it after every swap)
  and to the start of any other operation.
* **synchronize(device)** waits on the events of this backend's last operation on each
  stream it used there, never on the whole device.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._dists import duplicate_problem

try:
    import cupy
except ImportError as _exc:  # two CuPy builds over each other can break the import
    _problem = duplicate_problem()
    if _problem is not None:
        raise ImportError(_problem) from _exc
    raise

from kvcore import Backend, BackendCapabilities, Device, DType, TensorRef
from kvcore._array_ops import ArrayOps
from kvcore._staging import Pending, Transfer, chunk_bytes_from_env
from kvcore.errors import (BackendUnavailableError, DeviceMismatchError, DtypeMismatchError,
                           PoolAllocationError, UnsupportedError)

from . import _cuda
from ._array_ops import CupyOps
from ._handle import CupyKvCacheHandle

__all__ = ["CupyBackend"]

_NP_DTYPES = {DType.float16: np.dtype(np.float16), DType.float32: np.dtype(np.float32),
               DType.int8: np.dtype(np.int8), DType.uint8: np.dtype(np.uint8)}
_FROM_NP = {v: k for k, v in _NP_DTYPES.items()}
_CPU = Device("cpu")


def _device_count() -> int:
    """CUDA devices the runtime sees; raises the runtime's own error when it cannot
    (``cudaErrorInsufficientDriver``, ``cudaErrorNoDevice``, ...)."""
    return int(cupy.cuda.runtime.getDeviceCount())


#: What to install for a CuPy that can compile its kernels (CuPy 14 wheels need the
#: CUDA toolkit's NVRTC and headers, which their ``[ctk]`` extra brings).
_KERNEL_HINT = ('CuPy compiles these kernels at run time with NVRTC, which CuPy 14 wheels '
                'bring only with their [ctk] extra: pip install "kvcore-cupy[cuda12]" (or '
                '[cuda13]), or install a CUDA toolkit matching the cupy-cudaXXx wheel')


@functools.cache
def kernel_problem(device_index: int) -> str | None:
    """Why cupy cannot run the backend's indexed kernels on ``cuda:device_index`` (the
    exception it raised), or ``None`` when a scatter and a gather ran and were right.
    Cached: a compiler does not appear during a process."""
    try:
        _cuda.probe_kernels(device_index)
    except Exception as exc:  # noqa: BLE001 - CompileException, RuntimeError, ...: all are the reason
        return (f"cupy cannot run an indexing kernel on cuda:{device_index}: "
                f"{type(exc).__name__}: {exc}. {_KERNEL_HINT}")
    return None


def _where(array: Any) -> Device:
    return Device("cuda", int(array.device.id)) if isinstance(array, cupy.ndarray) else _CPU


def _import_error(obj: Any, exc: BaseException) -> Exception:
    """The typed error for a DLPack producer cupy could not import (as the numpy and
    torch backends raise them): the dtype when cupy cannot hold it, else a TypeError
    with the reason (a torch tensor that requires grad, an export refused, ...)."""
    dtype = str(getattr(obj, "dtype", ""))
    if "bfloat16" in dtype or "float8" in dtype or "bfloat16" in str(exc):
        return DtypeMismatchError(f"{type(obj).__name__} array has dtype {dtype or '?'}, "
                                  f"which the cupy backend cannot hold: {exc}")
    hint = "; call .detach() first" if getattr(obj, "requires_grad", False) else ""
    return TypeError(f"cupy could not import the {type(obj).__name__} through DLPack: "
                     f"{type(exc).__name__}: {exc}{hint}")


class CupyBackend(Backend):
    """Paged K/V pools as cupy arrays in CUDA device memory."""

    name = "cupy"
    array_library = "cupy"
    api_version = 2
    handle_class = CupyKvCacheHandle

    def __init__(self) -> None:
        #: Transfers still in flight (see the module docstring), finished before any
        #: operation touches data.
        self._pending: list[Pending] = []
        self._pending_lock = threading.Lock()
        self._order = _cuda.StreamOrder()
        self._staging_ops = _cuda.CupyStagingOps()
        #: Bytes one chunk of a swap moves (see :mod:`kvcore._staging`).
        self.transfer_chunk_bytes = chunk_bytes_from_env()

    @classmethod
    def probe(cls) -> None:
        """Check what a cache needs, each failure with its own reason: one CuPy
        distribution installed (not two builds over each other), a device the CUDA
        runtime sees (its exception says why not: ``cupy.is_available()`` would only say
        ``False``), and a scatter and gather kernel that compile and run on ``cuda:0``."""
        problem = duplicate_problem()
        if problem is not None:
            raise BackendUnavailableError(problem)
        try:
            count = _device_count()
        except Exception as exc:  # cupy raises CUDARuntimeError (a RuntimeError)
            raise BackendUnavailableError(
                f"cupy.cuda.runtime.getDeviceCount() failed: {exc}") from exc
        if count < 1:
            raise BackendUnavailableError(
                "no CUDA device: cupy.cuda.runtime.getDeviceCount() returned 0")
        problem = kernel_problem(0)
        if problem is not None:
            raise BackendUnavailableError(problem)

    def capabilities(self) -> BackendCapabilities:
        return BackendCapabilities(
            device_types=("cuda",),
            dtypes=(DType.float16, DType.float32, DType.uint8, DType.int8),
            unsupported_dtypes={DType.bfloat16: "cupy has no bfloat16 dtype"},
            # int8 codes: cupy's elementwise kernels; float8 needs a float8 dtype.
            codecs=(DType.int8,),
            unsupported_codecs={DType.float8_e4m3: "cupy has no float8 dtype",
                                DType.float8_e5m2: "cupy has no float8 dtype"},
            swap_device_types=("cpu", "cuda"),
            dlpack=True,
            pinned_memory=True,
        )

    def default_device(self) -> Device:
        return Device("cuda", 0)

    def check_device(self, device: Device) -> None:
        """Main pools live on ``cuda:N`` with ``N`` below the device count, where cupy
        can run its kernels."""
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
        problem = kernel_problem(device.index)
        if problem is not None:
            raise UnsupportedError(f"backend 'cupy' cannot place a pool on {device}: {problem}")

    def _check_any_device(self, device: Device) -> None:
        if device.type != "cpu":  # a pinned host array: the swap pool of a GPU pool
            self.check_device(device)

    # --- pools --------------------------------------------------------------------

    def allocate_layer(self, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int, dtype: DType, device: Device, *,
                       pinned: bool = False, planes: int = 2) -> Any:
        """A zeroed ``cupy.ndarray`` on ``cuda:N``, or for a ``cpu`` swap pool a numpy
        array (in pinned memory of exactly its size when ``pinned``)."""
        self._check_any_device(device)
        self.check_dtype(dtype)
        shape = (planes, num_blocks, block_size, num_kv_heads, head_dim)
        np_dtype = _NP_DTYPES[dtype]
        try:
            if device.type == "cpu":
                return (_cuda.allocate_pinned(shape, np_dtype) if pinned
                        else np.zeros(shape, np_dtype))
            with cupy.cuda.Device(device.index):
                pool = cupy.zeros(shape, np_dtype)
                # The zero fill is queued: a first use on another stream waits for it.
                self._order.end(pool, cupy.cuda.get_current_stream())
                return pool
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
            # Staged through CuPy's pinned pool and enqueued without blocking the host;
            # ``host`` is private, so nobody rewrites it under the copy.
            index = cupy.asarray(host, blocking=False)
            self._order.made(index)
        return index

    @staticmethod
    def _flat(pool: Any) -> Any:
        # [P, blocks, block_size, H, D] -> [P, blocks * block_size, H, D], a view.
        planes, blocks, bs, heads, dim = pool.shape
        return pool.reshape(planes, blocks * bs, heads, dim)

    def scatter(self, pool: Any, slots: Any, rows: Sequence[Any]) -> Any:
        if self._pending:
            self._finish_pending()
        if not isinstance(pool, cupy.ndarray):
            flat = self._flat(pool)
            for plane, values in enumerate(rows):
                flat[plane, slots] = values
            return pool
        with pool.device:
            stream = self._order.begin(pool, slots)
            flat = self._flat(pool)
            for plane, values in enumerate(rows):
                flat[plane, slots] = values
            self._order.end(pool, stream)
        return pool

    def gather(self, pool: Any, plane: int, slots: Any) -> Any:
        if self._pending:
            self._finish_pending()
        if not isinstance(pool, cupy.ndarray):
            return self._flat(pool)[plane].take(slots, axis=0)
        with pool.device:
            stream = self._order.begin(pool, slots)
            out = self._flat(pool)[plane].take(slots, axis=0)
            self._order.end(pool, stream)
        return out

    def gather_blocks(self, pool: Any, plane: int, blocks: Any) -> Any:
        if self._pending:
            self._finish_pending()
        if not isinstance(pool, cupy.ndarray):
            return pool[plane].take(blocks, axis=0)
        with pool.device:
            stream = self._order.begin(pool, blocks)
            out = pool[plane].take(blocks, axis=0)
            self._order.end(pool, stream)
        return out

    def copy_blocks(self, pool: Any, src: Any, dst: Any) -> Any:
        if self._pending:
            self._finish_pending()
        if not isinstance(pool, cupy.ndarray):
            pool[:, dst] = pool[:, src]
            return pool
        with pool.device:
            stream = self._order.begin(pool, src, dst)
            # The right-hand side is a new array, so overlapping src/dst copy correctly.
            pool[:, dst] = pool[:, src]
            self._order.end(pool, stream)
        return pool

    def transfer_blocks(self, src_pool: Any, src: Any, dst_pool: Any, dst: Any) -> Any:
        return self.transfer_blocks_layers([src_pool], src, [dst_pool], dst)[0]

    def transfer_blocks_layers(self, src_pools: Sequence[Any], src: Any,
                               dst_pools: Sequence[Any], dst: Any) -> list[Any]:
        """Every layer of a swap in one call, chunk by chunk (see
        :mod:`kvcore._staging`): the chunks of all layers share two pinned staging
        buffers, and the host lands each chunk while the next copies."""
        if self._pending:
            self._finish_pending()
        if not src_pools:
            return []
        s_gpu = isinstance(src_pools[0], cupy.ndarray)
        d_gpu = isinstance(dst_pools[0], cupy.ndarray)
        if not (s_gpu or d_gpu):  # two host pools
            for s_pool, d_pool in zip(src_pools, dst_pools):
                d_pool[:, dst] = s_pool[:, src]
            return list(dst_pools)
        order, transfer = self._order, Transfer(self._staging_ops, self.transfer_chunk_bytes)
        try:
            for s_pool, d_pool in zip(src_pools, dst_pools):
                if not d_gpu:  # swap out
                    with s_pool.device:
                        stream = order.begin(s_pool, src)
                        transfer.d2h(s_pool, src, d_pool, np.asarray(dst))
                        order.end(s_pool, stream)
                elif not s_gpu:  # swap in
                    with d_pool.device:
                        stream = order.begin(d_pool, dst)
                        transfer.h2d(s_pool, np.asarray(src), d_pool, dst)
                        order.end(d_pool, stream, transfer.last_event)
                else:
                    with s_pool.device:
                        s_stream = order.begin(s_pool, src)
                    with d_pool.device:
                        d_stream = order.begin(d_pool, dst)
                    transfer.d2d(s_pool, src, d_pool, dst,
                                 peer=s_pool.device.id != d_pool.device.id)
                    with d_pool.device:
                        order.end(d_pool, d_stream)
                    with s_pool.device:
                        order.end(s_pool, s_stream)
        except BaseException as exc:
            transfer.abort()
            if isinstance(exc, MemoryError):  # cupy's OutOfMemoryError is one
                raise PoolAllocationError(
                    f"cupy ran out of memory moving {int(src.shape[0])} blocks per layer "
                    f"from {_where(src_pools[0])} to {_where(dst_pools[0])} in chunks of "
                    f"{self.transfer_chunk_bytes} bytes: {exc}; the destination blocks "
                    "hold partial data") from exc
            raise
        jobs = transfer.close()
        with self._pending_lock:
            self._pending.extend(jobs)
        return list(dst_pools)

    def _finish_pending(self) -> None:
        """Wait for in-flight transfers and land device -> host copies in their pools."""
        with self._pending_lock:
            pending, self._pending = self._pending, []
            for job in pending:
                job.finish(self._staging_ops)

    def synchronize(self, device: Device) -> None:
        """Wait until every operation this backend queued for ``device`` has run and
        every transfer to it has landed: the last operation on each stream it used
        there (a transfer's own event), never the whole device."""
        if device.is_cuda:
            self._order.synchronize(device.index)
        if self._pending:
            self._finish_pending()

    # --- arrays -------------------------------------------------------------------

    def describe(self, array: Any) -> tuple[tuple[int, ...], DType | None, Device]:
        if not isinstance(array, (cupy.ndarray, np.ndarray)):
            raise TypeError(f"expected a cupy.ndarray, got {type(array).__name__}")
        return tuple(array.shape), _FROM_NP.get(np.dtype(array.dtype)), _where(array)

    def asarray(self, obj: Any, device: Device) -> Any:
        """``obj`` as a cupy array on ``device`` without copying: cupy arrays (and
        :class:`~kvcore.TensorRef`s holding one) pass through, other DLPack producers
        on the same GPU (torch CUDA tensors, ...) go through ``cupy.from_dlpack`` with
        that GPU current.  Failures are typed as on the other backends."""
        if isinstance(obj, TensorRef) and isinstance(obj.native, cupy.ndarray):
            obj = obj.native
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
        if getattr(obj, "requires_grad", False):  # torch would refuse the export
            raise _import_error(obj, BufferError("the tensor requires grad"))
        try:
            with cupy.cuda.Device(device.index):
                return cupy.from_dlpack(obj)
        except (BufferError, RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
            raise _import_error(obj, exc) from exc

    def to_numpy(self, array: Any) -> np.ndarray:
        if self._pending:
            self._finish_pending()
        if isinstance(array, np.ndarray):
            return np.array(array, copy=True)
        if not isinstance(array, cupy.ndarray):
            raise TypeError(f"expected a cupy.ndarray, got {type(array).__name__}")
        with array.device:
            self._order.begin(array)  # a pool: after this backend's last operation on it
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
