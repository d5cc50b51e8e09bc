"""Swapping sequences between the main pool and the swap pool (another device)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ._block_pool import BlockPool
from ._manager_state import ManagerState
from ._sequence import _Sequence
from .errors import CacheError, OutOfBlocksError, UnsupportedError

if TYPE_CHECKING:
    from ._paged_handle import PagedKvCacheHandle

__all__ = ["SwapMixin"]


class SwapMixin(ManagerState):
    """``swap_out`` / ``swap_in`` of :class:`~kvcore.KvCacheManager`."""

    def _require_swap(self) -> BlockPool:
        if self._swap_pool is None:
            raise UnsupportedError("this manager has no swap pool: set CacheConfig.swap_blocks")
        return self._swap_pool

    def swap_out(self, handle: PagedKvCacheHandle | str) -> None:
        """Move a sequence's blocks to the swap pool (on ``config.swap_device``) and
        release them here.  Its handles stay valid; data access waits for ``swap_in``."""
        with self._lock:
            swap = self._require_swap()
            seq = self._seq_of(handle, "swap_out")
            self._require_data(seq, "swap_out")
            blocks = seq.table._blocks
            if len(blocks) > swap.num_free:
                raise OutOfBlocksError(f"swap_out of {seq.request_id!r} needs {len(blocks)} "
                                       f"swap blocks, {swap.num_free} are free")
            dst = swap.allocate(len(blocks))
            self._swap_layers = self._transfer(self._layers, blocks, self._config.device,
                                               self._swap_layers, dst, self._config.swap_device)
            self._pool.free(blocks)
            seq.swap_blocks = dst
            seq.table._blocks = list(dst)
            self._moved(seq)

    def swap_in(self, handle: PagedKvCacheHandle | str) -> None:
        """Bring a swapped-out sequence back into the main pool, bit-identical."""
        with self._lock:
            swap = self._require_swap()
            seq = self._seq_of(handle, "swap_in")
            if seq.swap_blocks is None:
                raise CacheError(f"swap_in: request {seq.request_id!r} is not swapped out")
            src = seq.swap_blocks
            if len(src) > self._pool.num_free:
                self._failures += 1
                raise OutOfBlocksError(f"swap_in of {seq.request_id!r} needs {len(src)} blocks, "
                                       f"{self._pool.num_free} are free")
            dst = self._take(len(src))
            self._layers = self._transfer(self._swap_layers, src, self._config.swap_device,
                                          self._layers, dst, self._config.device)
            swap.free(src)
            seq.swap_blocks = None
            seq.table._blocks = list(dst)
            seq.private_from = 0
            self._moved(seq)

    def _moved(self, seq: _Sequence) -> None:
        seq.blocks_changed()
        seq.hashing = False  # blocks moved off the prefix cache: stop extending the chain
        seq.pending_tokens = []
        self._versions[seq.row] += 1
        self._after_change()

    def _transfer(self, src_layers: list[Any], src: list[int], src_device: Any,
                  dst_layers: list[Any], dst: list[int], dst_device: Any) -> list[Any]:
        """Copy blocks between pools; returns the destination pools now holding them."""
        if not src:
            return dst_layers
        be = self._backend
        src_i = be.index_array(np.asarray(src, dtype=np.int64), src_device)
        dst_i = be.index_array(np.asarray(dst, dtype=np.int64), dst_device)
        moved = be.transfer_blocks_layers(src_layers, src_i, dst_layers, dst_i)
        be.synchronize(dst_device)
        return list(moved)

