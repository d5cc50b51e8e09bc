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

__all__ = ["HandleHost", "SequenceReads"]


class SequenceReads(Protocol):
    """What a handle asks about its sequence (implemented by
    :class:`kvcore._handle_access.SequenceAccess`); every method checks the sequence is
    live and holds the manager's lock."""

    def require_live(self, seq: SequenceRecord, op: str) -> None: ...

    def read(self, seq: SequenceRecord, layer: int, plane: int) -> TensorRef | None: ...

    def read_pair(self, seq: SequenceRecord,
                  layer: int) -> tuple[TensorRef, TensorRef] | None: ...

    def num_written(self, seq: SequenceRecord, layer: int) -> int: ...

    def table(self, seq: SequenceRecord) -> BlockTable: ...

    def live_table(self, seq: SequenceRecord) -> BlockTable: ...

    def stats(self, seq: SequenceRecord) -> CacheHandleStats: ...

    def lengths(self, seq: SequenceRecord) -> tuple[int, int, bool]: ...

    def token_ids(self, seq: SequenceRecord) -> tuple[int, ...] | None: ...


class HandleHost(Protocol):
    """What a manager offers the handles it hands out."""

    _lock: threading.RLock
    _access: SequenceReads

    @property
    def config(self) -> CacheConfig: ...

    def write(self, handle: Any, layer: int, key: Any, value: Any, *,
              start: int | None = None) -> None: ...

    def layer_pool(self, layer: int) -> TensorRef: ...
