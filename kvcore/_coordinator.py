"""Coordinator: the parts of one manager, and the block moves that span several.

The manager is a facade over these parts, each owning its state:

* :class:`~kvcore._block_pool.BlockPool`: reference counts, empty and cached free
  blocks, eviction order;
* :class:`~kvcore._prefix_index.PrefixIndex`: recorded chains and the key map, exact
  verification of hits;
* :class:`~kvcore._sequence_table.SequenceTables`: every sequence's blocks, lengths,
  written counts, versions and prefix chain, as arrays by row;
* :class:`~kvcore._kv_store.KvStore`: the pools on the backend, writes, reads, block
  copies, which blocks are written for which layer;
* :class:`~kvcore._swap.SwapSpace` (optional): the swap pool.

The coordinator holds them together with the prefix hasher and the counters, and
implements the few moves that must keep several parts in step: taking fresh blocks
(pool + store + writer), releasing blocks (pool + index), copy-on-write (pool +
store + tables + index) and recording a sequence's full blocks in the prefix index
(tables + hasher + index).  Operations that change where a sequence's existing
slots are bump ``epoch``, which invalidates every remembered slot-mapping check.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._backend import Backend
from ._block_pool import BlockPool
from ._chain_hash import ChainHasher
from ._kv_store import KvStore
from ._prefix_index import ROOT, PrefixIndex
from ._sequence_table import SequenceTables
from ._swap import SwapSpace
from .models import CacheConfig

__all__ = ["Coordinator", "Counters"]


@dataclass
class Counters:
    """Lifetime counts behind :class:`~kvcore.CacheManagerStats`."""

    #: Full prompt blocks looked up in the prefix cache, and those served from it.
    queries: int = 0
    hits: int = 0
    #: The same in tokens: prompt tokens asked about, and tokens served (vLLM's units).
    query_tokens: int = 0
    hit_tokens: int = 0
    allocations: int = 0
    failures: int = 0
    cow: int = 0


class Coordinator:
    """The parts of one manager (see the module docstring)."""

    def __init__(self, config: CacheConfig, backend: Backend) -> None:
        c = config
        self.config = config
        self.backend = backend
        self.block_size = c.block_size
        self.store = KvStore(config, backend)
        try:
            self.index = PrefixIndex(c.num_blocks, c.block_size, self.store.complete)
            self.pool = BlockPool(c.num_blocks, on_evict=self.index.forget)
            self.index.on_drop = self.pool.uncache
            self.tables = SequenceTables(c.block_size, c.num_layers)
            self.swap = SwapSpace(config, backend) if c.swap_blocks else None
        except BaseException:
            self.store.close()
            raise
        self.hasher = ChainHasher(c.block_size, c.hash_seed)
        #: The row that fills each block: the one allowed to write a block others
        #: joined while its prefill was in flight.
        self.writer = np.full(c.num_blocks, -1, dtype=np.int64)
        self.counters = Counters()
        self.epoch = 0
        self._roots = np.array([self.hasher.root(None)], dtype=np.uint64)
        self._salt_names: list[str | None] = [None]

    # --- salts ----------------------------------------------------------------------

    def salt(self, extra_key: str | None) -> int:
        """The salt id of ``extra_key`` (its chain root is remembered)."""
        sid = self.index.salt_id(extra_key)
        if sid >= self._roots.size:
            self._salt_names.append(extra_key)
            self._roots = np.append(self._roots, np.uint64(self.hasher.root(extra_key)))
        return sid

    # --- blocks -----------------------------------------------------------------------

    def take(self, count: int, rows: np.ndarray | int) -> np.ndarray:
        """``count`` fresh blocks (nothing of anyone's in them), filled by ``rows``
        (one row, or one per block).  The caller checked there is room."""
        blocks = self.pool.allocate(count)
        if blocks.size:
            self.store.reset_blocks(blocks)
            self.writer[blocks] = rows
        return blocks

    def release(self, blocks: np.ndarray, *, unique: bool = True) -> None:
        """Drop one reference to each block; blocks nobody holds any more stay cached
        when the index can serve them, otherwise lose whatever was recorded of them."""
        if not blocks.size:
            return
        keep = self.index.servable(blocks)
        freed = self.pool.free(blocks, keep, unique=unique)
        if freed.size:
            self.index.forget(freed[~self.index.servable(freed)])

    def writable(self, rows: np.ndarray, blocks: np.ndarray, first: np.ndarray) -> np.ndarray:
        """Whether ``rows[i]`` may write into ``blocks[i]`` in place; ``first[i]`` says
        the position is written for the first time (at the layer concerned).  Never
        into a block the prefix cache can serve; into a block another table holds only
        for the first write of the row filling it while its prefill is in flight
        (the others joined that prefill)."""
        shared = self.pool.ref[blocks] > 1
        mine = first & (self.writer[blocks] == rows) & ~self.store.complete[blocks]
        return ~self.index.servable(blocks) & (~shared | mine)

    def copy_on_write(self, row: int, logical: np.ndarray) -> None:
        """Give ``row`` its own copy of its blocks at ``logical`` positions (the caller
        checked there is room); its slots there move, so its version changes."""
        if not logical.size:
            return
        tables = self.tables
        old = tables.blocks[row, logical].copy()
        new = self.take(logical.size, row)
        self.store.copy_blocks(old, new)
        tables.blocks[row, logical] = new
        self.release(old)
        self.counters.cow += logical.size
        tables.version[row] += 1
        self.epoch += 1

    # --- the prefix chain ---------------------------------------------------------------

    def root_key(self, salt: int) -> int:
        return int(self._roots[salt])

    def record_chain(self, row: int, first: int, stop: int,
                     keys: np.ndarray | None = None) -> None:
        """Remember the keys of ``row``'s full blocks ``[first, stop)`` (computed from
        its known token ids unless given) and record the blocks in the prefix index."""
        if stop <= first:
            return
        t, bs = self.tables, self.block_size
        tokens = t.token_ids[row, first * bs:stop * bs].reshape(stop - first, bs)
        if keys is None:
            parent_key = int(t.chain_key[row, first - 1]) if first else \
                self.root_key(int(t.salt[row]))
            keys = self.hasher.keys(tokens, parent_key)
        t.chain_key[row, first:stop] = keys
        t.hashed[row] = stop
        physical = t.blocks[row, first:stop]
        parents = t.blocks[row, first - 1:stop - 1] if first else \
            np.concatenate([[ROOT], t.blocks[row, :stop - 1]])
        self.index.record(physical, keys, tokens, parents, int(t.salt[row]))

    def record_step(self, rows: np.ndarray) -> None:
        """Each of ``rows`` just filled one more full block (the one after its last
        recorded): record it, for the whole batch in a fixed number of array calls."""
        if not rows.size:
            return
        t, bs = self.tables, self.block_size
        logical = t.hashed[rows]
        cols = logical[:, None] * bs + np.arange(bs)
        tokens = t.token_ids[rows[:, None], cols]
        has_parent = logical > 0
        prev = np.where(has_parent, logical - 1, 0)
        parent_keys = np.where(has_parent, t.chain_key[rows, prev], self._roots[t.salt[rows]])
        keys = self.hasher.step(parent_keys, tokens)
        t.chain_key[rows, logical] = keys
        t.hashed[rows] = logical + 1
        physical = t.blocks[rows, logical]
        parents = np.where(has_parent, t.blocks[rows, prev], ROOT)
        self.index.record(physical, keys, tokens, parents, t.salt[rows])

    # --- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Release every pool (main and swap) through the backend."""
        try:
            self.store.close()
        finally:
            if self.swap is not None:
                self.swap.close()
