"""SequenceDirectory: a manager's live sequences by request id, and how the handles
and request ids given to the manager are resolved into them.

Every check about *which* sequence a call is about lives here, with its typed error:
an unknown request id, a handle of another manager, a deallocated handle (or one of
a closed manager), a swapped-out sequence where data is needed, a batch naming a
sequence twice or given as a string.  The common case of a decode batch, this
manager's own live handles, costs a few attribute reads per handle and a few array
operations per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ._paged_handle import PagedKvCacheHandle
from ._sequence_table import SequenceRecord, SequenceTables
from .errors import HandleSwappedError, InvalidHandleError, UnknownRequestError

__all__ = ["SequenceDirectory"]


class SequenceDirectory:
    """The live sequences of one manager (see the module docstring)."""

    def __init__(self, owner: object, handle_class: type[PagedKvCacheHandle],
                 tables: SequenceTables) -> None:
        self._owner = owner
        self._handle_class = handle_class
        self._tables = tables
        #: Live sequences by request id, in allocation order.
        self.seqs: dict[str, SequenceRecord] = {}
        #: Set when the manager is closed (the errors then say so).
        self.closed = False

    def require_live(self, seq: SequenceRecord, op: str) -> None:
        if not seq.valid:
            why = "its manager was closed" if self.closed else "it was deallocated"
            raise InvalidHandleError(f"{op}: the cache of request {seq.request_id!r} is gone "
                                     f"({why}); this handle is no longer valid")

    def require_resident(self, seq: SequenceRecord, op: str) -> None:
        self.require_live(seq, op)
        if self._tables.swapped[seq.row]:
            raise HandleSwappedError(f"{op}: request {seq.request_id!r} is swapped out; "
                                     "call swap_in first")

    def seq_of(self, handle: Any, op: str) -> SequenceRecord:
        """The live sequence of a handle or request id."""
        if isinstance(handle, str):
            seq = self.seqs.get(handle)
            if seq is None:
                raise UnknownRequestError(f"{op}: no live cache has request id {handle!r}")
            return seq
        if not isinstance(handle, PagedKvCacheHandle):
            raise TypeError(f"{op}: expected a handle or a request id, got "
                            f"{type(handle).__name__}")
        if handle._manager is not self._owner:
            raise InvalidHandleError(f"{op}: handle of request {handle.request_id!r} belongs "
                                     "to a different manager")
        self.require_live(handle._seq, op)
        return handle._seq

    def batch(self, handles: Any, op: str) -> list[SequenceRecord]:
        """The live, resident, distinct sequences of ``handles`` (a list or tuple of
        handles or request ids)."""
        if isinstance(handles, (str, bytes)) or not isinstance(handles, Sequence):
            raise TypeError(f"{op}: expected a list of handles or request ids, got "
                            f"{type(handles).__name__}")
        cls, owner = self._handle_class, self._owner
        seqs = []
        append = seqs.append
        for h in handles:
            if type(h) is cls and h._manager is owner and h._seq.valid:
                append(h._seq)
            else:
                append(self.seq_of(h, op))
        rows = np.fromiter((s.row for s in seqs), dtype=np.int64, count=len(seqs))
        swapped = self._tables.swapped[rows]
        if swapped.any():
            self.require_resident(seqs[int(np.argmax(swapped))], op)
        if np.unique(rows).size != rows.size:
            values, counts = np.unique(rows, return_counts=True)
            twice = seqs[int(np.flatnonzero(rows == values[counts > 1][0])[0])]
            raise ValueError(f"{op}: request {twice.request_id!r} appears more than once in "
                             "the batch")
        return seqs

    def rows_of(self, handles: Sequence[Any], op: str) -> np.ndarray:
        """The rows of resident sequences (a page table's batch; repeats allowed)."""
        if isinstance(handles, (str, bytes)) or not isinstance(handles, Sequence):
            raise TypeError(f"{op}: expected a list of handles or request ids, got "
                            f"{type(handles).__name__}")
        seqs = [self.seq_of(h, op) for h in handles]
        for seq in seqs:
            self.require_resident(seq, op)
        return np.fromiter((s.row for s in seqs), dtype=np.int64, count=len(seqs))
