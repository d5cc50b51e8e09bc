"""The numpy backend: every contract operation is one fancy-indexing expression.

bfloat16 and the float8 codecs come from ``ml_dtypes`` (the package JAX uses): its
``bfloat16`` is a numpy dtype, so bfloat16 pools are plain numpy arrays and every
operation moves their bytes unchanged.  Conversions to and from float32 are done on
the bits, so NaN payloads survive.  DLPack has no way to carry ml_dtypes types:
numpy refuses to export or import them, so bfloat16 arrays of this backend do not
speak DLPack (declared in ``no_dlpack_dtypes``); zero-copy interop goes through a
16-bit integer view instead (``torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)``
and back with ``t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)``).

Quantized codecs store ``uint8`` / ``int8`` codes and ``float32`` scales; their
arithmetic is :class:`kvcore._array_ops.NamespaceOps` over numpy.  Without
``ml_dtypes`` installed the backend still runs float16, float32 and int8, and says
why it lacks the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kvcore import Backend, BackendCapabilities, Device, DType, TensorRef
from kvcore._array_ops import ArrayOps, NamespaceOps
from kvcore._backend import check_bits
from kvcore.errors import DeviceMismatchError, DtypeMismatchError, PoolAllocationError

from ._handle import NumpyKvCacheHandle

try:
    import ml_dtypes
except ImportError as exc:  # pragma: no cover - ml_dtypes is a dependency of kvcore-numpy
    ml_dtypes = None
    _NO_ML_DTYPES = f"ml_dtypes is not importable ({exc}); pip install ml_dtypes"

_NP_DTYPES = {DType.float16: np.dtype(np.float16), DType.float32: np.dtype(np.float32),
              DType.int8: np.dtype(np.int8), DType.uint8: np.dtype(np.uint8)}
#: The value types of the ml_dtypes formats (codecs compute with the float8 ones).
_ML_DTYPES: dict[DType, np.dtype] = {}
if ml_dtypes is not None:
    _NP_DTYPES[DType.bfloat16] = np.dtype(ml_dtypes.bfloat16)
    _ML_DTYPES = {DType.bfloat16: np.dtype(ml_dtypes.bfloat16),
                  DType.float8_e4m3: np.dtype(ml_dtypes.float8_e4m3fn),
                  DType.float8_e5m2: np.dtype(ml_dtypes.float8_e5m2)}
_FROM_NP = {v: k for k, v in _NP_DTYPES.items()}
_BF16 = _NP_DTYPES.get(DType.bfloat16)
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
        return _CAPS

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
        if isinstance(obj, TensorRef) and isinstance(obj.native, np.ndarray):
            return obj.native  # a read of this backend (bfloat16 ones cannot do DLPack)
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
        """A host copy; bfloat16 widened to float32 on the bits (exact, NaN payloads
        included)."""
        if array.dtype == _BF16:
            return (array.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
        return np.array(array, copy=True)

    def from_numpy(self, array: np.ndarray, dtype: DType, device: Device) -> np.ndarray:
        self.check_device(device)
        self.check_dtype(dtype)
        if dtype is DType.bfloat16 and np.asarray(array).dtype != _BF16:
            return bfloat16_from_float32(np.asarray(array, dtype=np.float32))
        return np.array(array, dtype=_NP_DTYPES[dtype], copy=True, order="C")

    def from_bits(self, bits: np.ndarray, dtype: DType, device: Device) -> np.ndarray:
        """A view of a copy of the bits: exact for every pattern."""
        self.check_device(device)
        self.check_dtype(dtype)
        return check_bits(bits, dtype).copy().view(_NP_DTYPES[dtype])

    def array_ops(self) -> ArrayOps:
        return _OPS


_OPS = NamespaceOps(np, dtypes={**_NP_DTYPES, **_ML_DTYPES})
_CAPS = BackendCapabilities(
    device_types=("cpu",),
    dtypes=tuple(d for d in (DType.float16, DType.bfloat16, DType.float32, DType.uint8,
                             DType.int8) if d in _NP_DTYPES),
    unsupported_dtypes={} if _BF16 is not None else {DType.bfloat16: _NO_ML_DTYPES},
    codecs=tuple(d for d in (DType.float8_e4m3, DType.float8_e5m2, DType.int8)
                 if d is DType.int8 or d in _ML_DTYPES),
    unsupported_codecs={} if _ML_DTYPES else {DType.float8_e4m3: _NO_ML_DTYPES,
                                              DType.float8_e5m2: _NO_ML_DTYPES},
    no_dlpack_dtypes={} if _BF16 is None else {
        DType.bfloat16: "numpy's DLPack export and import refuse ml_dtypes.bfloat16 (DLPack "
                        "has no code for ml_dtypes types in numpy); share it zero-copy through "
                        "an int16 view instead"},
    swap_device_types=("cpu",),
)


def bfloat16_from_float32(values: np.ndarray) -> np.ndarray:
    """float32 ``values`` as a new ml_dtypes bfloat16 array, rounded to nearest even;
    a NaN keeps its sign and the top of its payload (made quiet only when nothing of
    the payload would be left, which would read as infinity), where ml_dtypes' cast
    makes every NaN the same."""
    b = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    top = (b >> np.uint32(16)).astype(np.uint16)
    with np.errstate(over="ignore"):
        rounded = ((b + np.uint32(0x7FFF) + (top & np.uint16(1))) >> np.uint32(16))
    nan = (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    kept = np.where((top & np.uint16(0x7F)) == 0, top | np.uint16(0x40), top)
    return np.where(nan, kept, rounded.astype(np.uint16)).astype(np.uint16).view(_BF16)


def _import_error(obj: Any, exc: BaseException) -> Exception:
    """The typed error for a DLPack producer numpy could not import: the dtype when the
    producer's dtype is one numpy lacks (bfloat16), else a TypeError with the reason
    (a tensor that requires grad, a read-only export numpy refuses, ...)."""
    dtype = str(getattr(obj, "dtype", ""))
    if "bfloat16" in dtype or "float8" in dtype:
        return DtypeMismatchError(f"{type(obj).__name__} array has dtype {dtype}, which numpy "
                                  f"cannot import through DLPack: {exc}; pass a numpy "
                                  "ml_dtypes array instead (from torch without a copy: "
                                  "t.view(torch.int16).numpy().view(ml_dtypes.bfloat16))")
    return TypeError(f"numpy could not import the {type(obj).__name__} through DLPack: "
                     f"{type(exc).__name__}: {exc}")
