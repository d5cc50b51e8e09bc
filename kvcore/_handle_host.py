"""HandleHost: the one narrow protocol a handle uses to reach its manager.

A :class:`~kvcore.PagedKvCacheHandle` holds no state of its own, only its manager and
the :class:`~kvcore._sequence_table.SequenceRecord` it stands for; every answer comes
through these methods, which check that the sequence is still live and hold the
manager's lock.  Keeping the surface this small is what lets the manager's parts
change without touching handles (and keeps the import graph acyclic: handles import
this protocol, not the manager).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Protocol

from ._block_table import BlockTable
from ._tensor_ref import TensorRef
from .models import CacheConfig, CacheHandleStats

if TYPE_CHECKING:
    from ._sequence_table import SequenceRecord

__all__ = ["HandleHost"]


class HandleHost(Protocol):
    """What a manager offers the handles it hands out."""

    _lock: threading.RLock

    @property
    def config(self) -> CacheConfig: ...

    def _h_require_live(self, seq: SequenceRecord, op: str) -> None: ...

    def _h_read(self, seq: SequenceRecord, layer: int, plane: int) -> TensorRef | None: ...

    def _h_read_pair(self, seq: SequenceRecord,
                     layer: int) -> tuple[TensorRef, TensorRef] | None: ...

    def _h_num_written(self, seq: SequenceRecord, layer: int) -> int: ...

    def _h_table(self, seq: SequenceRecord) -> BlockTable: ...

    def _h_live_table(self, seq: SequenceRecord) -> BlockTable: ...

    def _h_stats(self, seq: SequenceRecord) -> CacheHandleStats: ...

    def _h_lengths(self, seq: SequenceRecord) -> tuple[int, int, bool]: ...

    def _h_token_ids(self, seq: SequenceRecord) -> tuple[int, ...] | None: ...

    def write(self, handle: Any, layer: int, key: Any, value: Any, *,
              start: int | None = None) -> None: ...

    def layer_pool(self, layer: int) -> TensorRef: ...
