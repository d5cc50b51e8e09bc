"""SequenceAccess: what a handle reads through, for one manager.

Every answer a :class:`~kvcore.PagedKvCacheHandle` gives about its sequence comes
from here: the sequence is checked live (and resident, for data), the manager's lock
is held, and fast-path writes are settled first, so a handle never sees half a step.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from . import _introspection as intro
from ._block_table import BlockTable
from ._coordinator import Coordinator
from ._directory import SequenceDirectory
from ._sequence_table import SequenceRecord
from ._tensor_ref import TensorRef
from ._writes import read_layer
from .models import CacheHandleStats

__all__ = ["SequenceAccess"]


class SequenceAccess:
    """Reads and facts about single sequences (see the module docstring)."""

    def __init__(self, lock: threading.RLock, directory: SequenceDirectory, co: Coordinator,
                 settle: Callable[[], None], check_layer: Callable[[Any], int]) -> None:
        self._lock = lock
        self._dir = directory
        self._co = co
        self._settle = settle
        self._check_layer = check_layer

    def require_live(self, seq: SequenceRecord, op: str) -> None:
        self._dir.require_live(seq, op)

    def read(self, seq: SequenceRecord, layer: int, plane: int) -> TensorRef | None:
        with self._lock:
            self._settle()
            self._dir.require_resident(seq, "key_cache" if plane == 0 else "value_cache")
            return read_layer(self._co, seq, self._check_layer(layer), plane)

    def read_pair(self, seq: SequenceRecord, layer: int) -> tuple[TensorRef, TensorRef] | None:
        with self._lock:
            key = self.read(seq, layer, 0)
            return None if key is None else (key, self.read(seq, layer, 1))  # type: ignore[return-value]

    def num_written(self, seq: SequenceRecord, layer: int) -> int:
        with self._lock:
            self._settle()
            self._dir.require_live(seq, "num_written")
            return int(self._co.tables.written[seq.row, self._check_layer(layer)])

    def lengths(self, seq: SequenceRecord) -> tuple[int, int, bool]:
        """(tokens, cached tokens, swapped) of a live sequence."""
        with self._lock:
            self._dir.require_live(seq, "num_tokens")
            t = self._co.tables
            return int(t.length[seq.row]), int(t.cached[seq.row]), bool(t.swapped[seq.row])

    def token_ids(self, seq: SequenceRecord) -> tuple[int, ...] | None:
        with self._lock:
            self._dir.require_live(seq, "token_ids")
            t = self._co.tables
            n = int(t.length[seq.row])
            if int(t.known[seq.row]) < n:
                return None
            return tuple(t.token_ids[seq.row, :n].tolist())

    def table(self, seq: SequenceRecord) -> BlockTable:
        """A snapshot of the table of the primary layer group (``NULL_BLOCK`` where a
        sliding window gave a block back)."""
        with self._lock:
            self._dir.require_live(seq, "block_table")
            co = self._co
            return BlockTable.snapshot(co.block_size,
                                       co.primary.table.row_blocks(seq.row).tolist(),
                                       int(co.tables.length[seq.row]))

    def live_table(self, seq: SequenceRecord) -> BlockTable:
        self._dir.require_live(seq, "block_table_mut")
        return seq.table

    def stats(self, seq: SequenceRecord) -> CacheHandleStats:
        with self._lock:
            self._dir.require_live(seq, "stats")
            return intro.handle_stats(self._co, seq.row)
