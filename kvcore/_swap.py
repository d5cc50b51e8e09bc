"""SwapSpace: second pools on another device that sequences move to and back.

``CacheConfig(swap_blocks=N, swap_device="cpu")`` gives a manager, for every layer
group, a swap pool of ``N`` blocks per layer (pinned host memory when it serves a
GPU pool).  Swapping out copies a sequence's blocks there in one backend call per
group (``transfer_blocks_layers``); swapping in copies them into fresh main blocks.
Both are all or nothing: if a transfer fails, the blocks reserved for it are given
back and the sequence is where it was.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._backend import Backend
from ._block_pool import BlockPool
from ._kv_store import KvStore, LayerLayout, allocate_pools, release_pools
from .errors import UnsupportedError
from .models import CacheConfig

__all__ = ["SwapSpace"]


class _SwapGroup:
    def __init__(self, config: CacheConfig, layout: LayerLayout, layers: int,
                 backend: Backend, pinned: bool) -> None:
        self.pool = BlockPool(config.swap_blocks)
        self.pools = [pool for layer in allocate_pools(backend, config, layout, layers,
                                                       config.swap_blocks, config.swap_device,
                                                       pinned=pinned)
                      for pool in layer]


class SwapSpace:
    """The swap pools of one manager: block accounting per layer group and the
    swap-side pools."""

    def __init__(self, config: CacheConfig, backend: Backend,
                 stores: list[KvStore]) -> None:
        c = config
        if c.swap_device.type not in backend.capabilities().swap_device_types:
            raise UnsupportedError(f"backend {backend.name!r} cannot swap to {c.swap_device}; "
                                   "it swaps to "
                                   f"{', '.join(backend.capabilities().swap_device_types)}")
        self.config = config
        self.backend = backend
        pinned = c.device.is_cuda and not c.swap_device.is_cuda
        self.groups: list[_SwapGroup] = []
        try:
            for store in stores:
                self.groups.append(_SwapGroup(c, store.layout, len(store.layers), backend,
                                              pinned))
        except BaseException:
            self.close()
            raise

    def room(self, group: int) -> int:
        return self.groups[group].pool.num_free

    def swap_out(self, store: KvStore, group: int, blocks: np.ndarray) -> np.ndarray:
        """Copy main ``blocks`` of one group here; returns the swap blocks now holding
        them.  The caller checked there is room.  On failure nothing is kept."""
        g = self.groups[group]
        dst = g.pool.allocate(blocks.size)
        if not blocks.size:
            return dst
        be, c = self.backend, self.config
        try:
            g.pools = list(be.transfer_blocks_layers(
                store.flat_pools(), store.index(blocks), g.pools,
                be.index_array(dst, c.swap_device)))
            be.synchronize(c.swap_device)
        except BaseException:
            g.pool.free(dst)
            raise
        return dst

    def swap_in(self, store: KvStore, group: int, src: np.ndarray, dst: np.ndarray) -> None:
        """Copy swap blocks ``src`` into main blocks ``dst`` of one group (the caller
        gives ``src`` back with :meth:`free` once every group succeeded)."""
        if not src.size:
            return
        g = self.groups[group]
        be, c = self.backend, self.config
        store.set_flat_pools(list(be.transfer_blocks_layers(
            g.pools, be.index_array(src, c.swap_device), store.flat_pools(), store.index(dst))))
        be.synchronize(c.device)

    def free(self, group: int, blocks: np.ndarray) -> None:
        self.groups[group].pool.free(blocks)

    def close(self) -> None:
        for g in self.groups:
            pools, g.pools = g.pools, []
            release_pools(self.backend, pools)

