"""Deliberately broken backends: the numpy backend with exactly one defect each.

Each class documents its defect and the contract clause the suite must report.
``BROKEN`` maps backend name -> (class, clause id, test that must fail).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from kv_numpy._backend import NumpyBackend
from kv_numpy._handle import NumpyKvCacheHandle

from kvcore import BackendCapabilities, Device, DType, TensorRef


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
        return BackendCapabilities(device_types=("cpu",), dtypes=tuple(DType),
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
        if n and np.array_equal(slots, np.arange(slots[0], slots[0] + n)):
            return self._flat(pool)[plane][slots[0]:slots[0] + n]
        return super().gather(pool, plane, slots)


#: name -> (backend class, clause id the suite must name, test that must fail).
BROKEN: dict[str, tuple[type[NumpyBackend], str, str]] = {
    PhysicalOrderGatherBackend.name: (PhysicalOrderGatherBackend, "backend.gather.order",
                                      "test_gather_returns_rows_in_slot_order"),
    NoopCopyBlocksBackend.name: (NoopCopyBlocksBackend, "manager.fork-cow",
                                 "test_fork_shares_until_written_then_copies"),
    CastingAsarrayBackend.name: (CastingAsarrayBackend, "manager.no-silent-cast",
                                 "test_write_of_another_dtype_raises"),
    StickyValidBackend.name: (StickyValidBackend, "handle.validity",
                              "test_deallocated_handles_are_invalid_everywhere"),
    ClampingLayerBackend.name: (ClampingLayerBackend, "handle.layer-range",
                                "test_layer_out_of_range_raises"),
    LossySwapBackend.name: (LossySwapBackend, "manager.swap",
                            "test_swap_round_trip_is_bit_identical"),
    OverclaimingBf16Backend.name: (OverclaimingBf16Backend, "backend.allocate-layer",
                                   "test_allocate_layer_is_zeroed_with_the_pool_layout"),
    AliasingGatherBackend.name: (AliasingGatherBackend, "backend.gather.copy",
                                 "test_gather_returns_a_copy"),
}
