"""kv_refbits: a third-party-style backend that keeps K/V as raw bit patterns.

Written from the backend contract (``kvcore.Backend``'s docstrings and
docs/writing-a-backend.md) only.  It stores every dtype as unsigned integers of the
same width, which gives it ``bfloat16`` on plain numpy, and wraps them in
:class:`BitsArray` so each array knows its kvcore dtype.  It does not speak DLPack and
says so in its capabilities, so the suite skips the DLPack clauses for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kvcore import FLOAT_DTYPES, Backend, BackendCapabilities, Device, DType, PagedKvCacheHandle
from kvcore.errors import DeviceMismatchError

_CPU = Device("cpu")
_BITS = {DType.float16: np.uint16, DType.bfloat16: np.uint16, DType.float32: np.uint32}
_FROM_NUMPY = {np.dtype(np.float16): DType.float16, np.dtype(np.float32): DType.float32}


class BitsArray:
    """Raw bits plus the kvcore dtype they encode."""

    __slots__ = ("bits", "dtype")

    def __init__(self, bits: np.ndarray, dtype: DType) -> None:
        self.bits = bits
        self.dtype = dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.bits.shape)


class RefBitsHandle(PagedKvCacheHandle):
    """The handle class of ``refbits`` (adds nothing; proves ``as_any`` works)."""

    __slots__ = ()


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, rounding to nearest even (exact for bf16 values); a
    NaN keeps its sign and the top of its payload (quiet if nothing else is left)."""
    b = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    top = (b >> np.uint32(16)).astype(np.uint16)
    with np.errstate(over="ignore"):
        rounded = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    kept = np.where((top & np.uint16(0x7F)) == 0, top | np.uint16(0x40), top)
    return np.where(nan, kept, rounded.astype(np.uint16)).astype(np.uint16)


class RefBitsBackend(Backend):
    """Pools of raw bits in host memory: float16, bfloat16 and float32."""

    name = "refbits"
    array_library = "numpy"
    api_version = 2
    handle_class = RefBitsHandle

    def capabilities(self) -> BackendCapabilities:
        return BackendCapabilities(device_types=("cpu",), dtypes=FLOAT_DTYPES,
                                   swap_device_types=("cpu",), dlpack=False)

    def allocate_layer(self, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int, dtype: DType, device: Device, *,
                       pinned: bool = False, planes: int = 2) -> BitsArray:
        self.check_device(device)
        self.check_dtype(dtype)
        shape = (planes, num_blocks, block_size, num_kv_heads, head_dim)
        return BitsArray(np.zeros(shape, _BITS[dtype]), dtype)

    def index_array(self, indices: np.ndarray, device: Device) -> np.ndarray:
        return np.array(indices, dtype=np.int64, copy=True)

    @staticmethod
    def _rows(layer: BitsArray) -> np.ndarray:
        planes, blocks, bs, heads, dim = layer.bits.shape
        return layer.bits.reshape(planes, blocks * bs, heads, dim)

    def scatter(self, pool: BitsArray, slots: np.ndarray,
                rows: Sequence[BitsArray]) -> BitsArray:
        flat = self._rows(pool)
        for plane, values in enumerate(rows):
            flat[plane, slots] = values.bits
        return pool

    def gather(self, pool: BitsArray, plane: int, slots: np.ndarray) -> BitsArray:
        return BitsArray(self._rows(pool)[plane].take(slots, axis=0), pool.dtype)

    def copy_blocks(self, pool: BitsArray, src: np.ndarray, dst: np.ndarray) -> BitsArray:
        pool.bits[:, dst] = pool.bits[:, src]
        return pool

    def transfer_blocks(self, src_pool: BitsArray, src: np.ndarray, dst_pool: BitsArray,
                        dst: np.ndarray) -> BitsArray:
        dst_pool.bits[:, dst] = src_pool.bits[:, src]
        return dst_pool

    def describe(self, array: Any) -> tuple[tuple[int, ...], DType | None, Device]:
        if isinstance(array, BitsArray):
            return array.shape, array.dtype, _CPU
        if isinstance(array, np.ndarray):
            return tuple(array.shape), _FROM_NUMPY.get(array.dtype), _CPU
        raise TypeError(f"expected a BitsArray or numpy array, got {type(array).__name__}")

    def asarray(self, obj: Any, device: Device) -> Any:
        if device.type != "cpu":
            raise DeviceMismatchError(f"refbits keeps everything on the cpu, not {device}")
        if isinstance(obj, BitsArray):
            return obj
        if isinstance(obj, np.ndarray):
            dtype = _FROM_NUMPY.get(obj.dtype)
            # Known float types become bits of the same dtype; anything else passes
            # through untouched so the manager sees (and refuses) its real dtype.
            return BitsArray(obj.view(_BITS[dtype]), dtype) if dtype else obj
        raise TypeError(f"refbits takes BitsArray or numpy arrays, got {type(obj).__name__}")

    def to_numpy(self, array: BitsArray) -> np.ndarray:
        if array.dtype is DType.float16:
            return array.bits.view(np.float16).copy()
        if array.dtype is DType.float32:
            return array.bits.view(np.float32).copy()
        return (array.bits.astype(np.uint32) << np.uint32(16)).view(np.float32)

    def from_numpy(self, array: np.ndarray, dtype: DType, device: Device) -> BitsArray:
        self.check_device(device)
        self.check_dtype(dtype)
        if dtype is DType.bfloat16:
            return BitsArray(_bf16_bits(np.asarray(array)), dtype)
        values = np.ascontiguousarray(array, dtype=np.float16 if dtype is DType.float16
                                      else np.float32)
        return BitsArray(values.view(_BITS[dtype]).copy(), dtype)
