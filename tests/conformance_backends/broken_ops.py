"""Planted bugs in the bulk operations and in bit patterns: the numpy backend with one
realistic defect each, every one invisible to the manager's own access patterns or to
random data (see ``broken.py`` for how they are used)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from kv_numpy._backend import NumpyBackend

from kvcore import Device, DType

from ._planted import FloatOnlyCapabilities, Planted


class DropsLastRowBackend(NumpyBackend):
    """scatter loses the last row of every write (an off-by-one in a length)."""

    name = "broken-drop-last-row"

    def scatter(self, pool: np.ndarray, slots: np.ndarray,
                rows: Sequence[np.ndarray]) -> np.ndarray:
        return super().scatter(pool, slots[:-1], [r[:-1] for r in rows])


class AddingScatterBackend(NumpyBackend):
    """scatter accumulates (``np.add.at``) instead of assigning: right on zeros only."""

    name = "broken-scatter-adds"

    def scatter(self, pool: np.ndarray, slots: np.ndarray,
                rows: Sequence[np.ndarray]) -> np.ndarray:
        flat = self._flat(pool)
        for plane, values in enumerate(rows):
            np.add.at(flat[plane], slots, values)
        return pool


class EndpointContiguityBackend(NumpyBackend):
    """gather takes a slice when the end points span exactly n slots, without checking
    the slots in between (blocks [0, 2, 1, 3] read as [0, 1, 2, 3])."""

    name = "broken-endpoint-run"

    def gather(self, pool: np.ndarray, plane: int, slots: np.ndarray) -> np.ndarray:
        if slots.ndim == 1 and len(slots) > 1 and slots[-1] - slots[0] == len(slots) - 1:
            return self._flat(pool)[plane][slots[0]:slots[-1] + 1].copy()
        return super().gather(pool, plane, slots)


class UncheckedWholeBlocksBackend(NumpyBackend):
    """gather reads whole blocks when every block's first slot is in place, without
    checking that the rest of each run follows in order."""

    name = "broken-whole-blocks"

    def gather(self, pool: np.ndarray, plane: int, slots: np.ndarray) -> np.ndarray:
        bs = pool.shape[2]
        if slots.ndim == 1 and len(slots) % bs == 0 and not (slots[::bs] % bs).any():
            return pool[plane].take(slots[::bs] // bs, axis=0).reshape(-1, *pool.shape[3:])
        return super().gather(pool, plane, slots)


class SixteenBitIndexBackend(NumpyBackend):
    """index_array stores slot ids as uint16 ("pools are never that big"): slot 65536
    is slot 0 again."""

    name = "broken-index16"

    def index_array(self, indices: np.ndarray, device: Device) -> np.ndarray:
        return np.array(indices, copy=True).astype(np.uint16)


class TwoPlanesOnlyBackend(NumpyBackend):
    """scatter unpacks ``key, value = rows``: one-plane pools (MLA latents) fail."""

    name = "broken-planes"

    def scatter(self, pool: np.ndarray, slots: np.ndarray,
                rows: Sequence[np.ndarray]) -> np.ndarray:
        key, value = rows
        flat = self._flat(pool)
        flat[0, slots] = key
        flat[1, slots] = value
        return pool


class LayerMixupBackend(NumpyBackend):
    """scatter_layers, written for speed, writes the first layer's rows everywhere."""

    name = "broken-layer-forms"

    def scatter_layers(self, pools: Sequence[np.ndarray], slots: np.ndarray,
                       rows: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
        return [self.scatter(pool, slots, rows[0]) for pool in pools]


class SignedZeroBackend(NumpyBackend):
    """scatter adds 0 on the way (a fused "x + bias" with bias 0): -0.0 becomes +0.0,
    signalling NaNs become quiet ones."""

    name = "broken-signed-zero"

    def scatter(self, pool: np.ndarray, slots: np.ndarray,
                rows: Sequence[np.ndarray]) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return super().scatter(pool, slots, [r + r.dtype.type(0) for r in rows])


class CanonicalNanBackend(FloatOnlyCapabilities, NumpyBackend):
    """from_numpy replaces every NaN with the one NaN (a "sanitising" conversion)."""

    name = "broken-nan-canonical"

    def from_numpy(self, array: np.ndarray, dtype: DType, device: Device) -> np.ndarray:
        out = super().from_numpy(array, dtype, device)
        return np.where(np.isnan(out), out.dtype.type(np.nan), out)


class ArithmeticCopyBackend(NumpyBackend):
    """copy_blocks copies through arithmetic (``x * 1``): signalling NaNs come out quiet."""

    name = "broken-copy-arith"

    def copy_blocks(self, pool: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            pool[:, dst] = pool[:, src] * pool.dtype.type(1)
        return pool


class FlushingSwapBackend(FloatOnlyCapabilities, NumpyBackend):
    """transfer_blocks flushes subnormals to zero (a swap path "cleaning" tiny values)."""

    name = "broken-subnormal-flush"

    def transfer_blocks(self, src_pool: np.ndarray, src: np.ndarray, dst_pool: np.ndarray,
                        dst: np.ndarray) -> np.ndarray:
        moved = src_pool[:, src]
        tiny = np.finfo(moved.dtype).tiny
        with np.errstate(invalid="ignore"):
            moved = np.where(np.abs(moved) < tiny, np.copysign(moved.dtype.type(0), moved), moved)
        dst_pool[:, dst] = moved
        return dst_pool


class SortedBlockGatherBackend(NumpyBackend):
    """gather_blocks walks each row's blocks in physical (sorted) order: right for a
    sequence whose blocks happen to ascend, wrong once the pool is fragmented."""

    name = "broken-gather-blocks-sorted"

    def gather_blocks(self, pool: np.ndarray, plane: int, blocks: np.ndarray) -> np.ndarray:
        return super().gather_blocks(pool, plane, np.sort(blocks, axis=-1))


OPS_BUGS = [
    Planted(DropsLastRowBackend, "backend.scatter", "test_scatter_writes_only_the_given_slots"),
    Planted(AddingScatterBackend, "backend.scatter.overwrite",
            "test_scatter_overwrites_what_was_there"),
    Planted(EndpointContiguityBackend, "backend.gather.order",
            "test_gather_returns_rows_in_slot_order"),
    Planted(UncheckedWholeBlocksBackend, "backend.gather.order",
            "test_gather_returns_rows_in_slot_order"),
    Planted(SortedBlockGatherBackend, "backend.gather-blocks",
            "test_gather_blocks_returns_whole_blocks_in_order_as_a_copy"),
    Planted(SixteenBitIndexBackend, "backend.large-pool", "test_large_pool_is_addressed_in_full"),
    Planted(TwoPlanesOnlyBackend, "backend.planes", "test_one_plane_pools"),
    Planted(LayerMixupBackend, "backend.layer-forms",
            "test_all_layer_forms_match_per_layer_operations"),
    Planted(SignedZeroBackend, "bits.scatter-gather",
            "test_special_values_survive_scatter_and_gather"),
    Planted(CanonicalNanBackend, "bits.numpy-roundtrip",
            "test_special_values_survive_from_and_to_numpy"),
    Planted(ArithmeticCopyBackend, "bits.copy-blocks", "test_special_values_survive_copy_blocks"),
    Planted(FlushingSwapBackend, "bits.transfer-blocks",
            "test_special_values_survive_transfer_blocks"),
]
