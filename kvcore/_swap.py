"""SwapSpace: a second pool on another device that sequences move to and back.

``CacheConfig(swap_blocks=N, swap_device="cpu")`` gives a manager a swap pool of
``N`` blocks per layer (pinned host memory when it serves a GPU pool).  Swapping out
copies a sequence's blocks there in one backend call per step (``transfer_blocks_
layers``); swapping in copies them into fresh main blocks.  Both are all or nothing:
if the transfer fails, the blocks reserved for it are given back and the sequence is
where it was.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._backend import Backend
from ._block_pool import BlockPool
from ._kv_store import KvStore, allocate_pools, release_pools
from .errors import UnsupportedError
from .models import CacheConfig

__all__ = ["SwapSpace"]


class SwapSpace:
    """The swap pool of one manager: block accounting and the swap-side pools."""

    def __init__(self, config: CacheConfig, backend: Backend) -> None:
        c = config
        if c.swap_device.type not in backend.capabilities().swap_device_types:
            raise UnsupportedError(f"backend {backend.name!r} cannot swap to {c.swap_device}; "
                                   "it swaps to "
                                   f"{', '.join(backend.capabilities().swap_device_types)}")
        self.config = config
        self.backend = backend
        self.pool = BlockPool(c.swap_blocks)
        pinned = c.device.is_cuda and not c.swap_device.is_cuda
        self.pools: list[Any] = allocate_pools(backend, c, c.swap_blocks, c.swap_device,
                                               pinned=pinned)

    def swap_out(self, store: KvStore, blocks: np.ndarray) -> np.ndarray:
        """Copy main ``blocks`` here; returns the swap blocks now holding them.  The
        caller checked there is room."""
        dst = self.pool.allocate(blocks.size)
        be, c = self.backend, self.config
        try:
            self.pools = list(be.transfer_blocks_layers(
                store.pools, store.index(blocks), self.pools,
                be.index_array(dst, c.swap_device)))
            be.synchronize(c.swap_device)
        except BaseException:
            self.pool.free(dst)
            raise
        return dst

    def swap_in(self, store: KvStore, src: np.ndarray, dst: np.ndarray) -> None:
        """Copy swap blocks ``src`` into main blocks ``dst`` and release ``src``."""
        be, c = self.backend, self.config
        store.pools = list(be.transfer_blocks_layers(
            self.pools, be.index_array(src, c.swap_device), store.pools, store.index(dst)))
        be.synchronize(c.device)
        self.pool.free(src)

    def close(self) -> None:
        pools, self.pools = self.pools, []
        release_pools(self.backend, pools)
