"""Planted bugs that only layer groups or quantized codecs bring out: the numpy backend
(or its handle class, or its array operations) with one realistic defect each, right
for every plain full-attention float cache (see ``broken.py`` for how they are used)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from kv_numpy._backend import NumpyBackend
from kv_numpy._handle import NumpyKvCacheHandle

from kvcore import DType, TensorRef
from kvcore._array_ops import ArrayOps, NamespaceOps
from kvcore.errors import CacheError

from ._planted import Planted

# --- layer groups ------------------------------------------------------------------------


class LengthCheckingHandle(NumpyKvCacheHandle):
    """Reads are checked to hold num_written(layer) rows, a guard against half-written
    layers whose author did not know that a sliding window reads from first_position."""

    __slots__ = ()

    def _checked(self, ref: TensorRef | None, layer: int) -> TensorRef | None:
        if ref is not None and len(ref) != self.num_written(layer):
            raise CacheError(f"short read of layer {layer}: {len(ref)} rows, "
                             f"{self.num_written(layer)} written")
        return ref

    def key_cache(self, layer: int) -> TensorRef | None:
        return self._checked(super().key_cache(layer), layer)

    def value_cache(self, layer: int) -> TensorRef | None:
        return self._checked(super().value_cache(layer), layer)


class WindowBlindBackend(NumpyBackend):
    name = "broken-window-reads"
    handle_class = LengthCheckingHandle


class LatentSqueezeBackend(NumpyBackend):
    """gather drops the head axis of one-plane one-head pools, taking them for MLA latent
    vectors that have no heads ([n, dim] instead of [n, 1, dim])."""

    name = "broken-latent-squeeze"

    def gather(self, pool: np.ndarray, plane: int, slots: np.ndarray) -> np.ndarray:
        out = super().gather(pool, plane, slots)
        if pool.shape[0] == 1 and pool.shape[3] == 1:
            return out.reshape(*out.shape[:-2], out.shape[-1])
        return out


class StackedCopyBackend(NumpyBackend):
    """copy_blocks_layers stacks every pool into one array to copy them in one call:
    right while every pool of the call has the same shape, a ValueError when K's and
    V's pools differ in width."""

    name = "broken-stacked-copy"

    def copy_blocks_layers(self, pools: Sequence[np.ndarray], src: np.ndarray,
                           dst: np.ndarray) -> list[np.ndarray]:
        stacked = np.stack(pools)
        stacked[:, :, dst] = stacked[:, :, src]
        for pool, copied in zip(pools, stacked):
            pool[...] = copied
        return list(pools)


class FullLayerPairHandle(NumpyKvCacheHandle):
    """kv_cache returns the pair only for a layer holding every token of the sequence
    (num_written == num_tokens), else None: wrong for a cross-attention layer, which
    holds the encoder's tokens."""

    __slots__ = ()

    def kv_cache(self, layer: int) -> tuple[TensorRef, TensorRef] | None:
        if self.num_written(layer) != self.num_tokens():
            return None
        return super().kv_cache(layer)


class CrossBlindBackend(NumpyBackend):
    name = "broken-cross-pair"
    handle_class = FullLayerPairHandle


# --- quantized codecs -------------------------------------------------------------------


class Float16BytePoolsBackend(NumpyBackend):
    """allocate_layer falls back to float16 for a dtype it has no table entry for, so
    uint8 / int8 code pools come out as float16 (declared, not delivered)."""

    name = "broken-byte-pools"

    def allocate_layer(self, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int, dtype: DType, device: Any, *, pinned: bool = False,
                       planes: int = 2) -> np.ndarray:
        if dtype in (DType.uint8, DType.int8):
            dtype = DType.float16
        return super().allocate_layer(num_blocks, block_size, num_kv_heads, head_dim, dtype,
                                      device, pinned=pinned, planes=planes)


class _TruncatingOps(NamespaceOps):
    def rint(self, a: Any) -> Any:
        return np.trunc(a)  # rounds toward zero: up to a whole code step off


class TruncatingCodecBackend(NumpyBackend):
    """Its array operations' rint truncates instead of rounding to nearest: int8 codes
    are up to one step (not half a step) off."""

    name = "broken-codec-trunc"

    def array_ops(self) -> ArrayOps:
        base = super().array_ops()
        return _TruncatingOps(np, dtypes=base.dtypes)  # type: ignore[attr-defined]


class OneDtypeSwapBackend(NumpyBackend):
    """transfer_blocks_layers stages every pool of a swap in one buffer typed like the
    first pool: right while all pools share a dtype, garbage for a codec cache's
    float32 scales behind its uint8 / int8 codes."""

    name = "broken-codec-swap"

    def transfer_blocks_layers(self, src_pools: Sequence[np.ndarray], src: np.ndarray,
                               dst_pools: Sequence[np.ndarray],
                               dst: np.ndarray) -> list[np.ndarray]:
        staging = src_pools[0].dtype
        with np.errstate(invalid="ignore", over="ignore"):
            moved = [pool[:, src].astype(staging) for pool in src_pools]
        for pool, blocks in zip(dst_pools, moved):
            pool[:, dst] = blocks
        return list(dst_pools)


GROUP_BUGS = [
    Planted(WindowBlindBackend, "groups.sliding-window",
            "test_sliding_window_holds_its_window_and_gives_old_blocks_back"),
    Planted(LatentSqueezeBackend, "groups.latent", "test_latent_layers_keep_one_vector_per_token"),
    Planted(StackedCopyBackend, "groups.kv-widths",
            "test_k_and_v_of_different_widths_keep_a_pool_each"),
    Planted(CrossBlindBackend, "groups.cross",
            "test_cross_attention_holds_the_encoder_tokens_written_once"),
    Planted(Float16BytePoolsBackend, "codec.storage", "test_code_and_scale_pools_carry_every_byte"),
    Planted(TruncatingCodecBackend, "codec.round-trip",
            "test_codec_round_trip_stays_within_its_declared_bound"),
    Planted(OneDtypeSwapBackend, "codec.codes-exact",
            "test_codec_reads_decode_the_stored_codes_and_moves_keep_them"),
]
