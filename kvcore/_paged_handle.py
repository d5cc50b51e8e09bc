"""PagedKvCacheHandle: the handle a :class:`~kvcore.KvCacheManager` hands out.

Backends subclass it (``NumpyKvCacheHandle``, ``TorchKvCacheHandle``, ...) to add
methods that return their own array type; ``handle.as_any(TorchKvCacheHandle)``
reaches them.  All state lives in the manager; a handle is a reference to one
sequence there, so clones are cheap and see the same data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._block_table import BlockTable
from ._device import Device
from ._handle import KvCacheHandle
from ._tensor_ref import TensorRef
from .models import CacheHandleStats

if TYPE_CHECKING:
    from ._manager import KvCacheManager, _Sequence

__all__ = ["PagedKvCacheHandle"]


class PagedKvCacheHandle(KvCacheHandle):
    """A reference to one sequence in a :class:`~kvcore.KvCacheManager`."""

    __slots__ = ("_manager", "_seq")

    def __init__(self, manager: KvCacheManager, seq: _Sequence) -> None:
        self._manager = manager
        self._seq = seq

    # --- identity -----------------------------------------------------------------

    @property
    def request_id(self) -> str:
        return self._seq.request_id

    @property
    def manager(self) -> KvCacheManager:
        return self._manager

    def cache_id(self) -> str:
        return self._seq.cache_id

    def is_valid(self) -> bool:
        return self._seq.valid

    def is_swapped(self) -> bool:
        """Whether the blocks are in the swap pool (``swap_in`` before data access)."""
        return self._seq.swap_blocks is not None

    def clone_handle(self) -> PagedKvCacheHandle:
        self._manager._require_live(self._seq, "clone_handle")
        return type(self)(self._manager, self._seq)

    # --- shape --------------------------------------------------------------------

    def device(self) -> Device:
        return self._manager.config.device

    def num_layers(self) -> int:
        return self._manager.config.num_layers

    def num_heads(self) -> int:
        return self._manager.config.num_kv_heads

    def head_dim(self) -> int:
        return self._manager.config.head_dim

    # --- table --------------------------------------------------------------------

    def block_table(self) -> BlockTable:
        with self._manager._lock:
            self._manager._require_live(self._seq, "block_table")
            return self._seq.table.copy()

    def block_table_mut(self) -> BlockTable:
        """The live table, guarded: ``extend_sequence`` goes through the manager
        (copy-on-write included) and ``add_blocks`` is refused, because physical
        blocks come only from the manager's pool."""
        self._manager._require_live(self._seq, "block_table_mut")
        return self._seq.table

    def num_tokens(self) -> int:
        return self._seq.table.sequence_length

    def num_cached_tokens(self) -> int:
        """Prompt tokens served from the prefix cache at allocation; their K/V were
        already written by an earlier sequence, so prefill may skip them."""
        return self._seq.num_cached_tokens

    def num_written(self, layer: int) -> int:
        """Tokens whose K/V have been written for ``layer`` (what a read returns)."""
        return self._manager._num_written(self._seq, layer)

    # --- data ---------------------------------------------------------------------

    def key_cache(self, layer: int) -> TensorRef | None:
        return self._manager._read(self._seq, layer, 0)

    def value_cache(self, layer: int) -> TensorRef | None:
        return self._manager._read(self._seq, layer, 1)

    def kv_cache(self, layer: int) -> tuple[TensorRef, TensorRef] | None:
        return self._manager._read_pair(self._seq, layer)

    def write(self, layer: int, key: Any, value: Any, *, start: int | None = None) -> None:
        """Shorthand for ``manager.write(self, layer, key, value, start=start)``."""
        self._manager.write(self, layer, key, value, start=start)

    def stats(self) -> CacheHandleStats:
        return self._manager._handle_stats(self._seq)

    def __repr__(self) -> str:
        seq = self._seq
        state = "valid" if seq.valid else "deallocated"
        if seq.valid and seq.swap_blocks is not None:
            state = "swapped"
        return (f"{type(self).__name__}(request_id={seq.request_id!r}, "
                f"tokens={seq.table.sequence_length}, blocks={seq.table.num_blocks}, {state})")
