"""What every part of :class:`~kvcore.KvCacheManager` may rely on.

The manager is one class assembled from mixins, one concern per module.  They all
derive from :class:`ManagerState`, which declares the state ``KvCacheManager.__init__``
creates and the helpers it defines, so each module type-checks on its own.  Nothing
here runs: the declarations are annotations, and the helper signatures exist only for
type checkers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ._backend import Backend
from ._block_pool import BlockPool
from ._prefix_cache import ChainHasher
from ._sequence import _Sequence
from .models import CacheConfig, CacheManagerStats, MemoryPressure

if TYPE_CHECKING:
    from ._paged_handle import PagedKvCacheHandle

__all__ = ["ManagerState"]


class ManagerState:
    """Declarations shared by the manager's mixins (see the module docstring)."""

    _config: CacheConfig
    _backend: Backend
    _lock: threading.RLock
    _pool: BlockPool
    _swap_pool: BlockPool | None
    _hasher: ChainHasher
    _layers: list[Any]
    _swap_layers: list[Any]
    _seqs: dict[str, _Sequence]
    #: Per sequence row: tokens written per layer; a version bumped when slots move.
    _written: np.ndarray
    _versions: np.ndarray
    #: Per physical block: layers holding all its tokens; all of them.
    _filled: np.ndarray
    _complete: np.ndarray
    #: The last decode step's mapping and its precomputed checks (see _extension).
    _decode: Any
    _on_pressure: Callable[[MemoryPressure, CacheManagerStats], None] | None
    _pressure: MemoryPressure
    _queries: int
    _hits: int
    _allocations: int
    _failures: int
    _cow: int

    if TYPE_CHECKING:  # implemented by KvCacheManager
        def _seq_of(self, handle: PagedKvCacheHandle | str, op: str) -> _Sequence: ...
        def _require_live(self, seq: _Sequence, op: str) -> None: ...
        def _require_data(self, seq: _Sequence, op: str) -> None: ...
        def _check_layer(self, layer: Any) -> int: ...
        def _take(self, count: int) -> list[int]: ...
        def _copy_blocks(self, src: list[int], dst: list[int]) -> None: ...
        def _after_change(self) -> None: ...
