"""The numpy backend: every contract operation is one fancy-indexing expression."""

from __future__ import annotations

from typing import Any

import numpy as np

from kvcore import Backend, BackendCapabilities, Device, DType
from kvcore.errors import DeviceMismatchError

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
                       pinned: bool = False) -> np.ndarray:
        self.check_device(device)
        self.check_dtype(dtype)
        return np.zeros((2, num_blocks, block_size, num_kv_heads, head_dim), _NP_DTYPES[dtype])

    def index_array(self, indices: np.ndarray, device: Device) -> np.ndarray:
        return np.asarray(indices, dtype=np.int64)

    @staticmethod
    def _flat(layer: np.ndarray) -> np.ndarray:
        # [2, blocks, block_size, H, D] -> [2, blocks * block_size, H, D], a view.
        two, blocks, bs, heads, dim = layer.shape
        return layer.reshape(two, blocks * bs, heads, dim)

    def scatter(self, layer: np.ndarray, slots: np.ndarray, key: np.ndarray,
                value: np.ndarray) -> None:
        flat = self._flat(layer)
        flat[0, slots] = key
        flat[1, slots] = value

    def gather(self, layer: np.ndarray, kv: int, slots: np.ndarray) -> np.ndarray:
        bs = layer.shape[2]
        n = slots.shape[0]
        # A sequence read in logical order is whole blocks, each slot run starting on a
        # block boundary.  Taking whole blocks copies block_size rows per index instead
        # of one; row-by-row take measured ~2x slower than a plain copy of the same
        # bytes.  The check is exact and O(n) in numpy, a few us next to the copy.
        if n >= _WHOLE_BLOCKS_FROM * bs:
            firsts = slots[::bs]
            if not (firsts % bs).any():
                runs = firsts[:, None] + np.arange(bs, dtype=slots.dtype)
                if np.array_equal(runs.reshape(-1)[:n], slots):
                    whole = layer[kv].take(firsts // bs, axis=0)
                    return whole.reshape(-1, *layer.shape[3:])[:n]
        return self._flat(layer)[kv].take(slots, axis=0)

    def copy_blocks(self, layer: np.ndarray, src: np.ndarray, dst: np.ndarray) -> None:
        layer[:, dst] = layer[:, src]

    def transfer_blocks(self, src_layer: np.ndarray, src: np.ndarray,
                        dst_layer: np.ndarray, dst: np.ndarray) -> None:
        dst_layer[:, dst] = src_layer[:, src]

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
            where = f"cuda:{dl_id}" if int(dl_type) == 2 else f"DLPack device type {int(dl_type)}"
            raise DeviceMismatchError(f"array is on {where}, the cache is on {device}; "
                                      "move it to the cpu first")
        return np.from_dlpack(obj)

    def to_numpy(self, array: np.ndarray) -> np.ndarray:
        return np.array(array, copy=True)

    def from_numpy(self, array: np.ndarray, dtype: DType, device: Device) -> np.ndarray:
        self.check_device(device)
        self.check_dtype(dtype)
        return np.ascontiguousarray(array, dtype=_NP_DTYPES[dtype])
