"""The numpy backend: every contract operation is one fancy-indexing expression."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kvcore import Backend, BackendCapabilities, Device, DType
from kvcore._array_ops import ArrayOps, NamespaceOps
from kvcore.errors import DeviceMismatchError, DtypeMismatchError, PoolAllocationError

from ._handle import NumpyKvCacheHandle

_NP_DTYPES = {DType.float16: np.dtype(np.float16), DType.float32: np.dtype(np.float32)}
_FROM_NP = {v: k for k, v in _NP_DTYPES.items()}
_CPU = Device("cpu")
#: Reads of at least this many blocks try the whole-block gather (below it, the
#: structure check costs more than it saves).
_WHOLE_BLOCKS_FROM = 4


class NumpyBackend(Backend):
    """Paged K/V pools as numpy arrays in host memory."""

    name = "numpy"
    array_library = "numpy"
    api_version = 2
    handle_class = NumpyKvCacheHandle

    def capabilities(self) -> BackendCapabilities:
        return BackendCapabilities(
            device_types=("cpu",),
            dtypes=(DType.float16, DType.float32),
            unsupported_dtypes={DType.bfloat16: "numpy has no bfloat16 dtype"},
            swap_device_types=("cpu",),
        )

    def allocate_layer(self, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int, dtype: DType, device: Device, *,
                       pinned: bool = False, planes: int = 2) -> np.ndarray:
        self.check_device(device)
        self.check_dtype(dtype)
        shape = (planes, num_blocks, block_size, num_kv_heads, head_dim)
        try:
            return np.zeros(shape, _NP_DTYPES[dtype])
        except (MemoryError, ValueError) as exc:  # ValueError: "array is too big"
            nbytes = int(np.prod(shape, dtype=object)) * _NP_DTYPES[dtype].itemsize
            raise PoolAllocationError(f"numpy could not allocate a pool of {nbytes} bytes "
                                      f"(shape {list(shape)}, {dtype.value}): {exc}") from exc

    def index_array(self, indices: np.ndarray, device: Device) -> np.ndarray:
        # A copy: the index must not change when the caller reuses its array.
        return np.array(indices, dtype=np.int64, copy=True)

    @staticmethod
    def _flat(layer: np.ndarray) -> np.ndarray:
        # [P, blocks, block_size, H, D] -> [P, blocks * block_size, H, D], a view.
        planes, blocks, bs, heads, dim = layer.shape
        return layer.reshape(planes, blocks * bs, heads, dim)

    def scatter(self, pool: np.ndarray, slots: np.ndarray,
                rows: Sequence[np.ndarray]) -> np.ndarray:
        flat = self._flat(pool)
        for plane, values in enumerate(rows):
            # Index the plane first (a view), then the slots: numpy's first-axis
            # fancy assignment is ~3x faster than flat[plane, slots] = values.
            target = flat[plane]
            target[slots] = values
        return pool

    def gather(self, pool: np.ndarray, plane: int, slots: np.ndarray) -> np.ndarray:
        bs = pool.shape[2]
        n = slots.shape[0]
        # A sequence read in logical order is whole blocks, each slot run starting on a
        # block boundary.  Taking whole blocks copies block_size rows per index instead
        # of one; row-by-row take measured ~2x slower than a plain copy of the same
        # bytes.  The check is exact and O(n) in numpy, a few us next to the copy.
        if slots.ndim == 1 and n >= _WHOLE_BLOCKS_FROM * bs:
            firsts = slots[::bs]
            if not (firsts % bs).any():
                runs = firsts[:, None] + np.arange(bs, dtype=slots.dtype)
                if np.array_equal(runs.reshape(-1)[:n], slots):
                    whole = pool[plane].take(firsts // bs, axis=0)
                    return whole.reshape(-1, *pool.shape[3:])[:n]
        return self._flat(pool)[plane].take(slots, axis=0)

    def gather_blocks(self, pool: np.ndarray, plane: int, blocks: np.ndarray) -> np.ndarray:
        # Whole blocks: block_size rows copied per index, the rate of a plain copy.
        return pool[plane].take(blocks, axis=0)

    def copy_blocks(self, pool: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        pool[:, dst] = pool[:, src]
        return pool

    def transfer_blocks(self, src_pool: np.ndarray, src: np.ndarray,
                        dst_pool: np.ndarray, dst: np.ndarray) -> np.ndarray:
        dst_pool[:, dst] = src_pool[:, src]
        return dst_pool

    def describe(self, array: Any) -> tuple[tuple[int, ...], DType | None, Device]:
        if not isinstance(array, np.ndarray):
            raise TypeError(f"expected a numpy.ndarray, got {type(array).__name__}")
        return array.shape, _FROM_NP.get(array.dtype), _CPU

    def asarray(self, obj: Any, device: Device) -> np.ndarray:
        if isinstance(obj, np.ndarray):
            return obj
        if not hasattr(obj, "__dlpack_device__"):
            raise TypeError(f"expected an array (numpy.ndarray or a DLPack producer), "
                            f"got {type(obj).__name__}")
        dl_type, dl_id = obj.__dlpack_device__()
        if int(dl_type) != 1:  # kDLCPU; 2 is CUDA, 3 pinned CUDA host memory, ...
            try:
                where = str(Device.from_dlpack(dl_type, dl_id))
            except ValueError:
                where = f"DLPack device type {int(dl_type)}"
            raise DeviceMismatchError(f"array is on {where}, the cache is on {device}; "
                                      "move it to the cpu first")
        try:
            return np.from_dlpack(obj)
        except (BufferError, RuntimeError, TypeError, ValueError) as exc:
            raise _import_error(obj, exc) from exc

    def to_numpy(self, array: np.ndarray) -> np.ndarray:
        return np.array(array, copy=True)

    def from_numpy(self, array: np.ndarray, dtype: DType, device: Device) -> np.ndarray:
        self.check_device(device)
        self.check_dtype(dtype)
        return np.array(array, dtype=_NP_DTYPES[dtype], copy=True, order="C")

    def array_ops(self) -> ArrayOps:
        return _OPS


_OPS = NamespaceOps(np)


def _import_error(obj: Any, exc: BaseException) -> Exception:
    """The typed error for a DLPack producer numpy could not import: the dtype when the
    producer's dtype is one numpy lacks (bfloat16), else a TypeError with the reason
    (a tensor that requires grad, a read-only export numpy refuses, ...)."""
    dtype = str(getattr(obj, "dtype", ""))
    if "bfloat16" in dtype or "float8" in dtype:
        return DtypeMismatchError(f"{type(obj).__name__} array has dtype {dtype}, which numpy "
                                  f"cannot hold: {exc}")
    return TypeError(f"numpy could not import the {type(obj).__name__} through DLPack: "
                     f"{type(exc).__name__}: {exc}")
