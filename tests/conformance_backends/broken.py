"""Deliberately broken backends: the numpy (or torch) backend with exactly one defect each.

Each class documents its defect.  ``BROKEN`` maps the name a planted bug is
registered under to its :class:`Planted` record: the contract clause the suite's
first failure must name, and a test of that clause that must fail.  This module has
the first eight; ``broken_arrays``, ``broken_ops`` and ``broken_torch`` one or more
per class of bug the suite hunts (identity, pools, arrays, orders, sizes, caches,
overwrites, bit patterns), ``broken_groups`` one per clause of layer groups and
quantized codecs.  None of it is part of any distribution.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from kv_numpy._backend import NumpyBackend
from kv_numpy._handle import NumpyKvCacheHandle

from kvcore import FLOAT_DTYPES, BackendCapabilities, Device, DType, TensorRef

from ._planted import Planted


class PhysicalOrderGatherBackend(NumpyBackend):
    """gather walks the slots in physical (sorted) order, not the order asked for."""

    name = "broken-gather-order"

    def gather(self, pool: np.ndarray, plane: int, slots: np.ndarray) -> np.ndarray:
        return super().gather(pool, plane, np.sort(slots))


class NoopCopyBlocksBackend(NumpyBackend):
    """copy_blocks (copy-on-write) does nothing."""

    name = "broken-cow-copy"

    def copy_blocks(self, pool: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        return pool


class CastingAsarrayBackend(NumpyBackend):
    """asarray 'helpfully' converts every float array to float16 (its author only tried
    fp16 caches), so a float32 write into a float16 cache is silently cast."""

    name = "broken-silent-cast"

    def asarray(self, obj: Any, device: Device) -> np.ndarray:
        array = super().asarray(obj, device)
        return array.astype(np.float16) if array.dtype.kind == "f" else array


class StickyValidHandle(NumpyKvCacheHandle):
    """is_valid() is True forever, even after deallocation."""

    __slots__ = ()

    def is_valid(self) -> bool:
        return True


class StickyValidBackend(NumpyBackend):
    name = "broken-sticky-valid"
    handle_class = StickyValidHandle


class ClampingLayerHandle(NumpyKvCacheHandle):
    """key_cache / value_cache clamp an out-of-range layer into range and return data."""

    __slots__ = ()

    def _clamp(self, layer: Any) -> Any:
        if isinstance(layer, int) and not isinstance(layer, bool):
            return min(max(layer, 0), self.num_layers() - 1)
        return layer

    def key_cache(self, layer: int) -> TensorRef | None:
        return super().key_cache(self._clamp(layer))

    def value_cache(self, layer: int) -> TensorRef | None:
        return super().value_cache(self._clamp(layer))


class ClampingLayerBackend(NumpyBackend):
    name = "broken-layer-range"
    handle_class = ClampingLayerHandle


class LossySwapBackend(NumpyBackend):
    """transfer_blocks (swap) moves K but forgets V."""

    name = "broken-swap"

    def transfer_blocks(self, src_pool: np.ndarray, src: np.ndarray,
                        dst_pool: np.ndarray, dst: np.ndarray) -> np.ndarray:
        dst_pool[0, dst] = src_pool[0, src]
        return dst_pool


class OverclaimingBf16Backend(NumpyBackend):
    """Declares bfloat16 but keeps such pools as float32 (a capability not delivered)."""

    name = "broken-bf16-claim"

    def capabilities(self) -> BackendCapabilities:
        return BackendCapabilities(device_types=("cpu",), dtypes=FLOAT_DTYPES,
                                   swap_device_types=("cpu",))

    def allocate_layer(self, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int, dtype: DType, device: Device, *,
                       pinned: bool = False, planes: int = 2) -> np.ndarray:
        if dtype is DType.bfloat16:
            return np.zeros((planes, num_blocks, block_size, num_kv_heads, head_dim),
                            np.float32)
        return super().allocate_layer(num_blocks, block_size, num_kv_heads, head_dim, dtype,
                                      device, pinned=pinned, planes=planes)

    def from_numpy(self, array: np.ndarray, dtype: DType, device: Device) -> np.ndarray:
        if dtype is DType.bfloat16:
            return np.ascontiguousarray(array, dtype=np.float32)
        return super().from_numpy(array, dtype, device)


class AliasingGatherBackend(NumpyBackend):
    """gather returns a view into the pool when the slots are one contiguous run, so
    what a reader got changes under it when the pool is written."""

    name = "broken-gather-view"

    def gather(self, pool: np.ndarray, plane: int, slots: np.ndarray) -> np.ndarray:
        n = slots.shape[0]
        if slots.ndim == 1 and n and np.array_equal(slots, np.arange(slots[0], slots[0] + n)):
            return self._flat(pool)[plane][slots[0]:slots[0] + n]
        return super().gather(pool, plane, slots)


ORIGINAL_BUGS = [
    Planted(PhysicalOrderGatherBackend, "backend.gather.order",
            "test_gather_returns_rows_in_slot_order"),
    Planted(NoopCopyBlocksBackend, "backend.copy-blocks", "test_copy_blocks_copies_whole_blocks"),
    Planted(CastingAsarrayBackend, "backend.asarray",
            "test_asarray_keeps_native_arrays_and_their_dtype"),
    Planted(StickyValidBackend, "handle.validity",
            "test_deallocated_handles_are_invalid_everywhere"),
    Planted(ClampingLayerBackend, "handle.layer-range", "test_layer_out_of_range_raises"),
    Planted(LossySwapBackend, "backend.transfer-blocks",
            "test_transfer_blocks_round_trips_through_the_swap_device"),
    Planted(OverclaimingBf16Backend, "backend.allocate-layer",
            "test_allocate_layer_is_zeroed_with_the_pool_layout"),
    Planted(AliasingGatherBackend, "backend.gather.copy", "test_gather_returns_a_copy"),
]


def _planted() -> dict[str, Planted]:
    from .broken_arrays import ARRAY_BUGS
    from .broken_groups import GROUP_BUGS
    from .broken_ops import OPS_BUGS
    bugs = [*ORIGINAL_BUGS, *ARRAY_BUGS, *OPS_BUGS, *GROUP_BUGS]
    try:
        from .broken_torch import TORCH_BUGS
    except ImportError:  # torch not installed: the torch bugs cannot exist here
        TORCH_BUGS = []
    out = {bug.registered_name: bug for bug in [*bugs, *TORCH_BUGS]}
    if len(out) != len(bugs) + len(TORCH_BUGS):
        raise RuntimeError("two planted bugs share a name")
    return out


#: registered name -> the planted bug.
BROKEN: dict[str, Planted] = _planted()


def register_all() -> list[str]:
    """Register every planted bug (and ``refbits``) in code, each under its
    registered name; returns the names (for :func:`unregister_all`)."""
    import kvcore

    from .refbits import RefBitsBackend
    names = []
    for name, bug in BROKEN.items():
        kvcore.register_backend(kvcore.BackendSpec(name=name, load=lambda cls=bug.backend: cls,
                                                   api_version=2), replace_existing=True)
        names.append(name)
    kvcore.register_backend(RefBitsBackend, replace_existing=True)
    return [*names, RefBitsBackend.name]


def unregister_all(names: list[str]) -> None:
    import kvcore
    for name in names:
        kvcore.unregister_backend(name)
