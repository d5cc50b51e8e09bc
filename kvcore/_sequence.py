"""The manager's record of one sequence, and the guarded block table it owns."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from ._block_table import BlockTable
from .errors import CacheError

__all__ = ["_Sequence", "_ManagedBlockTable", "_managed_table"]

_ids = itertools.count()


class _Sequence:
    """Everything the manager knows about one request.  Handles point here."""

    __slots__ = ("request_id", "cache_id", "table", "row", "valid", "swap_blocks",
                 "num_cached_tokens", "private_from", "hashing", "parent_hash",
                 "num_hashed_blocks", "pending_tokens", "last_access", "block_arr",
                 "read_key", "read_index")

    def __init__(self, request_id: str, row: int, block_size: int, blocks: list[int],
                 length: int, grow: Callable[[_Sequence, int], Any]) -> None:
        self.request_id = request_id
        self.cache_id = f"{request_id}#{next(_ids)}"
        #: ``grow(seq, n)`` is the manager's extend: the live table routes growth there.
        self.table = _managed_table(block_size, blocks, length, lambda n: grow(self, n))
        self.row = row
        self.valid = True
        self.swap_blocks: list[int] | None = None
        self.num_cached_tokens = 0
        #: Blocks at logical index >= private_from are referenced by this table only.
        self.private_from = 0
        #: Prefix-hash chain state: the hash of the last full block, the number of
        #: blocks hashed so far and the tokens of the partial block after them.
        self.hashing = False
        self.parent_hash = 0
        self.num_hashed_blocks = 0
        self.pending_tokens: list[int] = []
        self.last_access = time.time()
        self.block_arr: np.ndarray | None = None
        self.read_key: tuple[int, int] | None = None
        self.read_index: Any = None

    def blocks(self) -> np.ndarray:
        if self.block_arr is None:
            self.block_arr = np.asarray(self.table._blocks, dtype=np.int64)
        return self.block_arr

    def blocks_changed(self) -> None:
        self.block_arr = None
        self.read_key = None


class _ManagedBlockTable(BlockTable):
    """The live table of a managed sequence.  Growth is routed through the manager so
    accounting and copy-on-write stay right; blocks cannot be added by hand."""

    __slots__ = ("_grow",)

    def add_blocks(self, blocks: Iterable[int]) -> None:
        raise CacheError("blocks of a managed cache come from its manager's pool; use "
                         "KvCacheManager.extend(handle, num_tokens) to grow it")

    def extend_sequence(self, num_tokens: int) -> None:
        # Validate and refuse exactly as a plain table would, without changing it...
        probe = self.copy()
        probe.extend_sequence(num_tokens)
        # ...then let the manager grow it (copy-on-write of a shared last block).
        if probe.sequence_length != self._length:
            self._grow(probe.sequence_length - self._length)


def _managed_table(block_size: int, blocks: list[int], length: int,
                   grow: Callable[[int], Any]) -> _ManagedBlockTable:
    table = _ManagedBlockTable.__new__(_ManagedBlockTable)
    table._block_size, table._blocks, table._length, table._grow = block_size, blocks, length, grow
    return table
