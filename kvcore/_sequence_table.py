"""SequenceTables: every live sequence's state, as arrays indexed by a row number.

A decode step touches every running sequence; keeping lengths, block tables,
written counts and prefix-chain state in numpy arrays indexed by *row* (not in one
Python object per sequence) lets the manager do a whole step in a fixed number of
array operations, whatever the batch size.

A row belongs to one sequence from allocation to deallocation.  Its ``version`` is
bumped whenever the sequence's existing slots move (copy-on-write, fork, swap,
truncate, release), so a :class:`~kvcore.SlotMapping` made before is recognised as
stale; a released row keeps counting, so a mapping can never match a later owner of
the same row.

:class:`SequenceRecord` is the identity a handle holds: request id, row, cache id and
validity.  The managed :class:`BlockTable` view reads the arrays.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from ._block_table import BlockTable
from .errors import CacheError, InvalidHandleError

__all__ = ["DIGEST_DTYPE", "GroupTable", "ManagedBlockTable", "SequenceRecord",
           "SequenceTables"]

_ids = itertools.count()
#: One 16-byte chain digest per element.
DIGEST_DTYPE = np.dtype("V16")


class GroupTable:
    """One layer group's block table of every row: physical block ids in logical
    order (-1 past the end, and for blocks a sliding window released), how many
    logical blocks each row has, and how many leading ones were released."""

    def __init__(self, rows: int, width: int) -> None:
        self.blocks = np.full((rows, width), -1, dtype=np.int64)
        self.num_blocks = np.zeros(rows, dtype=np.int64)
        #: Leading logical blocks given back (sliding window): ``blocks[:released]`` is -1.
        self.released = np.zeros(rows, dtype=np.int64)

    @property
    def width(self) -> int:
        return self.blocks.shape[1]

    def grow_rows(self, rows: int) -> None:
        old = self.blocks.shape[0]
        blocks = np.full((rows, self.width), -1, dtype=np.int64)
        blocks[:old] = self.blocks
        self.blocks = blocks
        for name in ("num_blocks", "released"):
            array = np.zeros(rows, dtype=np.int64)
            array[:old] = getattr(self, name)
            setattr(self, name, array)

    def ensure_width(self, blocks: int) -> None:
        if blocks <= self.width:
            return
        grown = np.full((self.blocks.shape[0], max(blocks, 2 * self.width)), -1,
                        dtype=np.int64)
        grown[:, :self.width] = self.blocks
        self.blocks = grown

    def row_blocks(self, row: int) -> np.ndarray:
        """The row's blocks in logical order, released ones included as -1 (a view)."""
        return self.blocks[row, :self.num_blocks[row]]

    def held(self, row: int) -> np.ndarray:
        """The blocks the row holds (a view, released ones left out)."""
        return self.blocks[row, self.released[row]:self.num_blocks[row]]

    def release_row(self, row: int) -> None:
        self.blocks[row] = -1
        self.num_blocks[row] = 0
        self.released[row] = 0

    def copy_row(self, src: int, dst: int) -> None:
        self.blocks[dst] = self.blocks[src]
        self.num_blocks[dst] = self.num_blocks[src]
        self.released[dst] = self.released[src]


class SequenceTables:
    """Per-row state of every live sequence of one manager (see the module docstring):
    what all layer groups share, and one :class:`GroupTable` per group."""

    def __init__(self, block_size: int, num_layers: int, num_groups: int = 1,
                 rows: int = 16, width: int = 8, *, digests: bool = False) -> None:
        self.block_size = block_size
        self.num_layers = num_layers
        #: Whether ``digest`` is kept (a store, or ``crypto_block_keys``); else it has no
        #: columns and costs nothing.
        self.keeps_digests = digests
        self._alloc(rows, width)
        self.groups = [GroupTable(rows, width) for _ in range(num_groups)]
        self._free_rows = list(range(rows - 1, -1, -1))

    def _alloc(self, rows: int, width: int) -> None:
        bs, layers = self.block_size, self.num_layers
        self.length = np.zeros(rows, dtype=np.int64)
        #: Tokens whose K/V are written, per layer (a written prefix; encoder tokens
        #: for cross-attention layers).
        self.written = np.zeros((rows, layers), dtype=np.int64)
        self.version = np.zeros(rows, dtype=np.int64)
        #: Prompt tokens served from the prefix cache at allocation.
        self.cached = np.zeros(rows, dtype=np.int64)
        #: Blocks [0, joined) were shared while their prefill was still in flight;
        #: reads check them until every layer is written.
        self.joined = np.zeros(rows, dtype=np.int64)
        self.swapped = np.zeros(rows, dtype=bool)
        #: Encoder tokens reserved (cross-attention groups).
        self.encoder = np.zeros(rows, dtype=np.int64)
        # The prefix chain: whether full blocks keep being recorded, how many are, the
        # key of each, the salt, and the token ids known from the start.
        self.hashing = np.zeros(rows, dtype=bool)
        self.hashed = np.zeros(rows, dtype=np.int64)
        self.chain_key = np.zeros((rows, width), dtype=np.uint64)
        #: The keyed cryptographic chain key (16 bytes) of each full block, valid below
        #: ``hashed`` (kept by :mod:`kvcore._chain_digests` when ``keeps_digests``).
        self.digest = np.zeros((rows, width if self.keeps_digests else 0), dtype=DIGEST_DTYPE)
        self.salt = np.zeros(rows, dtype=np.int64)
        self.token_ids = np.zeros((rows, width * bs), dtype=np.int32)
        self.known = np.zeros(rows, dtype=np.int64)
        self.last_access = np.zeros(rows, dtype=np.float64)

    _FIELDS = ("length", "written", "version", "cached", "joined", "swapped", "encoder",
               "hashing", "hashed", "chain_key", "salt", "token_ids", "known", "last_access",
               "digest")
    _WIDE = ("chain_key", "token_ids", "digest")

    @property
    def capacity(self) -> int:
        return self.length.shape[0]

    @property
    def chain_width(self) -> int:
        """Blocks of token ids and chain keys a row can hold before the arrays widen."""
        return self.chain_key.shape[1]

    # --- rows ---------------------------------------------------------------------

    def take_row(self) -> int:
        if not self._free_rows:
            old = self.capacity
            for name in self._FIELDS:
                array = getattr(self, name)
                grown = np.zeros((2 * old, *array.shape[1:]), dtype=array.dtype)
                grown[:old] = array
                setattr(self, name, grown)
            for group in self.groups:
                group.grow_rows(2 * old)
            self._free_rows = list(range(2 * old - 1, old - 1, -1))
        return self._free_rows.pop()

    def release_row(self, row: int) -> None:
        """Forget the row's sequence; its version moves on so old mappings stay stale."""
        for group in self.groups:
            group.release_row(row)
        for name in ("length", "cached", "joined", "encoder", "hashed", "known", "salt"):
            getattr(self, name)[row] = 0
        self.written[row] = 0
        self.swapped[row] = False
        self.hashing[row] = False
        self.version[row] += 1
        self._free_rows.append(row)

    def ensure_chain_width(self, blocks: int) -> None:
        """Make room for ``blocks`` blocks of token ids and chain keys per row."""
        if blocks <= self.chain_width:
            return
        new = max(blocks, 2 * self.chain_width)
        bs = self.block_size
        for name in self._WIDE:
            array = getattr(self, name)
            cols = new * bs if name == "token_ids" else new
            if name == "digest" and not self.keeps_digests:
                continue
            grown = np.zeros((array.shape[0], cols), dtype=array.dtype)
            grown[:, :array.shape[1]] = array
            setattr(self, name, grown)

    def copy_row(self, src: int, dst: int) -> None:
        """Make row ``dst`` a copy of row ``src`` (fork)."""
        for name in self._FIELDS:
            if name != "version":
                getattr(self, name)[dst] = getattr(self, name)[src]
        for group in self.groups:
            group.copy_row(src, dst)


class SequenceRecord:
    """A live (or ended) sequence: what a handle points to.  State lives in the
    manager's :class:`SequenceTables` row ``row``."""

    __slots__ = ("request_id", "row", "cache_id", "valid", "read_key", "read_index",
                 "table")

    def __init__(self, request_id: str, row: int, tables: SequenceTables,
                 grow: Callable[[SequenceRecord, int], Any], group: int = 0) -> None:
        self.request_id = request_id
        self.row = row
        self.cache_id = f"{request_id}#{next(_ids)}"
        self.valid = True
        #: (version, group, first, stop) of the cached read index, and the index.
        self.read_key: tuple[int, int, int, int] | None = None
        self.read_index: Any = None
        #: The live, guarded block table handed out by ``block_table_mut``.
        self.table = ManagedBlockTable(tables, self, grow, group)


class ManagedBlockTable(BlockTable):
    """The live table of a managed sequence: reads the manager's arrays.  Growth is
    routed through the manager so accounting and copy-on-write stay right; blocks
    cannot be added by hand."""

    __slots__ = ("_tables", "_seq", "_grow", "_group")

    def __init__(self, tables: SequenceTables, seq: SequenceRecord,
                 grow: Callable[[SequenceRecord, int], Any], group: int = 0) -> None:
        self._block_size = tables.block_size
        self._tables = tables
        self._seq = seq
        self._grow = grow
        self._group = group

    def _live_row(self) -> int:
        # A dead sequence's row may already hold another request: never read it.
        if not self._seq.valid:
            raise InvalidHandleError(f"the block table of request {self._seq.request_id!r} "
                                     "belongs to a deallocated cache; take block_table() "
                                     "from a live handle")
        return self._seq.row

    @property  # type: ignore[override]
    def _blocks(self) -> list[int]:
        return self._tables.groups[self._group].row_blocks(self._live_row()).tolist()

    @property  # type: ignore[override]
    def _length(self) -> int:
        return int(self._tables.length[self._live_row()])

    def __repr__(self) -> str:
        if not self._seq.valid:
            return f"<BlockTable of deallocated request {self._seq.request_id!r}>"
        return super().__repr__()

    def add_blocks(self, blocks: Iterable[int]) -> None:
        raise CacheError("blocks of a managed cache come from its manager's pool; use "
                         "KvCacheManager.extend(handle, num_tokens) to grow it")

    def extend_sequence(self, num_tokens: int) -> None:
        # Validate and refuse exactly as a plain table would, without changing it...
        probe = self.copy()
        probe.extend_sequence(num_tokens)
        # ...then let the manager grow it (copy-on-write of a shared last block).
        if probe.sequence_length != self._length:
            self._grow(self._seq, probe.sequence_length - self._length)

    def __reduce__(self) -> Any:
        return (BlockTable, (self._block_size, self._blocks, self._length))
