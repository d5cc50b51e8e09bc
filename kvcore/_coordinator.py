"""Coordinator: the parts of one manager, and the block moves that span several.

The manager is a facade over these parts, each owning its state.  Per layer group
(a config without ``layer_groups`` has one, of every layer):

* :class:`~kvcore._block_pool.BlockPool`: reference counts, empty and cached free
  blocks, eviction order;
* :class:`~kvcore._prefix_index.PrefixIndex`: recorded chains and the key map, exact
  verification of hits;
* :class:`~kvcore._kv_store.KvStore`: the pools on the backend, writes, reads, block
  copies, which blocks are written for which layer;
* a :class:`~kvcore._sequence_table.GroupTable`: every sequence's blocks.

Shared by the groups: :class:`~kvcore._sequence_table.SequenceTables` (lengths,
written counts, versions and the prefix chain of every sequence, as arrays by row),
the prefix hasher, the counters and the optional :class:`~kvcore._swap.SwapSpace`.

The coordinator implements the few moves that must keep several parts in step:
taking fresh blocks (pool + store + writer), releasing blocks (pool + index),
copy-on-write (pool + store + table + index) and recording a sequence's full blocks
in every group's prefix index (tables + hasher + index).  Operations that change
where a sequence's existing slots are bump ``epoch``, which invalidates every
remembered slot-mapping check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ._backend import Backend
from ._block_pool import BlockPool
from ._chain_hash import ChainHasher
from ._kv_store import KvStore
from ._prefix_index import ROOT, UNREACHABLE, PrefixIndex
from ._salts import SaltRegistry
from ._sequence_table import GroupTable, SequenceTables
from ._swap import SwapSpace
from .models import CacheConfig, GroupKind, GroupLayout

__all__ = ["Coordinator", "Counters", "GroupParts"]


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
    #: Blocks a sliding window gave back while their sequence went on.
    window_releases: int = 0


class BlockLink(Protocol):
    """What the coordinator tells the optional link beyond the process (a store, or
    cryptographic block keys; :mod:`kvcore._store_link`): full blocks recorded in the
    prefix chain, and blocks that became complete.  ``None`` when there is none, so
    a cache without one pays a ``None`` check."""

    def recorded(self, row: int, first: int, stop: int, keys: np.ndarray) -> None: ...

    def recorded_step(self, rows: np.ndarray, logical: np.ndarray, tokens: np.ndarray,
                      keys: np.ndarray) -> None: ...

    def completed(self, group: GroupParts, blocks: np.ndarray) -> None: ...

    def stats_fields(self) -> dict[str, int]: ...


class GroupParts:
    """One layer group's pool, prefix index, store, table and block writers."""

    def __init__(self, config: CacheConfig, layout: GroupLayout, backend: Backend,
                 table: GroupTable) -> None:
        self.layout = layout
        self.kind = layout.kind
        self.window = layout.window
        self.store = KvStore(config, layout, backend)
        #: The row that fills each block: the one allowed to write a block others
        #: joined while its prefill was in flight (-1: none, or it gave the block back
        #: unwritten).
        self.writer = np.full(layout.num_blocks, -1, dtype=np.int64)
        self.prefix = PrefixIndex(layout.num_blocks, config.block_size, self.store.complete,
                                  self.writer)
        self.pool = BlockPool(layout.num_blocks, on_evict=self.prefix.forget)
        self.prefix.on_drop = self.pool.uncache
        self.table = table

    @property
    def token_based(self) -> bool:
        return self.kind is not GroupKind.cross

    def take(self, count: int, rows: np.ndarray | int) -> np.ndarray:
        """``count`` fresh blocks (nothing of anyone's in them), filled by ``rows`` (one
        row, or one per block).  The caller checked there is room."""
        blocks = self.pool.allocate(count)
        if blocks.size:
            self.store.reset_blocks(blocks)
            self.writer[blocks] = rows
        return blocks

    def release(self, blocks: np.ndarray, *, unique: bool = True,
                by: np.ndarray | int | None = None) -> None:
        """Drop one reference to each block, given back by row(s) ``by``; blocks nobody
        holds any more stay cached when the index can serve them, otherwise lose
        whatever was recorded of them.

        A block ``by`` was to fill that others joined and still hold, unwritten, is
        *orphaned*: nobody will write it, so no new request joins it (the prefix index
        reads ``writer``) and its joiners' reads say so
        (:func:`kvcore._writes.read_layer`); once a holder writes it, it is served as
        usual."""
        if not blocks.size:
            return
        if by is not None:
            orphan = (self.writer[blocks] == by) & ~self.store.complete[blocks]
            if orphan.any():
                self.writer[blocks[orphan]] = -1
        keep = self.prefix.servable(blocks)
        freed = self.pool.free(blocks, keep, unique=unique)
        if freed.size:
            self.prefix.forget(freed[~self.prefix.servable(freed)])

    def writable(self, rows: np.ndarray, blocks: np.ndarray, first: np.ndarray) -> np.ndarray:
        """Whether ``rows[i]`` may write into ``blocks[i]`` in place; ``first[i]`` says
        the position is written for the first time (at the layer concerned).  Never
        into a block the prefix cache can serve; into a block another table holds only
        for the first write of the row filling it while its prefill is in flight
        (the others joined that prefill)."""
        shared = self.pool.ref[blocks] > 1
        mine = first & (self.writer[blocks] == rows) & ~self.store.complete[blocks]
        return ~self.prefix.servable(blocks) & (~shared | mine)


class Coordinator:
    """The parts of one manager (see the module docstring)."""

    def __init__(self, config: CacheConfig, backend: Backend) -> None:
        c = config
        self.config = config
        self.backend = backend
        self.block_size = c.block_size
        self.layouts = c.groups
        self.tables = SequenceTables(c.block_size, c.num_layers, len(self.layouts),
                                     digests=c.store is not None or c.crypto_block_keys)
        self.groups: list[GroupParts] = []
        self.swap: SwapSpace | None = None
        try:
            for layout in self.layouts:
                self.groups.append(GroupParts(c, layout, backend,
                                              self.tables.groups[layout.index]))
            if c.swap_blocks:
                self.swap = SwapSpace(c, backend, [g.store for g in self.groups])
        except BaseException:
            self.close()
            raise
        #: For each layer: its group and its index among the group's layers.
        self.layer_group = [0] * c.num_layers
        self.layer_local = [0] * c.num_layers
        for g in self.groups:
            for local, layer in enumerate(g.layout.layers):
                self.layer_group[layer] = g.layout.index
                self.layer_local[layer] = local
        self.token_groups = [g for g in self.groups if g.token_based]
        self.cross_groups = [g for g in self.groups if not g.token_based]
        #: The group a sequence's ``block_table()`` shows: the first that keeps every
        #: token (full or latent), else the first token group.
        self.primary = next((g for g in self.groups if g.kind in (GroupKind.full,
                                                                  GroupKind.latent)),
                            self.token_groups[0] if self.token_groups else self.groups[0])
        self.hasher = ChainHasher(c.block_size, c.hash_seed)
        self.counters = Counters()
        self.epoch = 0
        self.salts = SaltRegistry(self.hasher, self._salts_in_use)
        #: The link beyond the process, set by the manager (see :class:`BlockLink`).
        self.link: BlockLink | None = None

    def group(self, index: object) -> GroupParts:
        """Layer group ``index`` (``None``: the primary group)."""
        if index is None:
            return self.primary
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) \
                or not 0 <= index < len(self.groups):
            raise ValueError(f"group must be a layer group index 0..{len(self.groups) - 1}, "
                             f"got {index!r}")
        return self.groups[int(index)]

    # --- salts ----------------------------------------------------------------------

    def salt(self, extra_key: str | None) -> int:
        """The salt id of ``extra_key`` (see :mod:`kvcore._salts`)."""
        return self.salts.id(extra_key)

    def extra_key(self, salt: int) -> str | None:
        """The ``extra_key`` of a live salt id (the inverse of :meth:`salt`)."""
        return self.salts.name(salt)

    def root_key(self, salt: int) -> int:
        return self.salts.root(salt)

    def _salts_in_use(self) -> np.ndarray:
        """Salt ids a sequence row (free rows hold 0) or a recorded block refers to."""
        used = [self.tables.salt]
        used += [g.prefix.salt[g.prefix.recorded] for g in self.token_groups]
        return np.concatenate(used)

    # --- blocks -----------------------------------------------------------------------

    def copy_on_write(self, row: int, group: GroupParts, logical: np.ndarray) -> None:
        """Give ``row`` its own copy of its blocks of ``group`` at ``logical`` positions
        (the caller checked there is room); its slots there move, so its version
        changes."""
        if not logical.size:
            return
        table = group.table
        old = table.blocks[row, logical].copy()
        new = group.take(logical.size, row)
        group.store.copy_blocks(old, new)
        table.blocks[row, logical] = new
        group.release(old, by=row)
        self.counters.cow += logical.size
        self.tables.version[row] += 1
        self.epoch += 1

    def joined_blocks(self, group: GroupParts, row: int) -> np.ndarray:
        """The blocks of ``group`` that ``row`` shares with a prefill in flight (joined at
        allocation and not yet known complete)."""
        joined = int(self.tables.joined[row])
        return group.table.held(row)[:max(0, joined - int(group.table.released[row]))]

    def joined_complete(self, row: int) -> bool:
        """Whether every block ``row`` joined is written for every layer (then it is no
        longer pending, and the joined count is cleared)."""
        if not self.tables.joined[row]:
            return True
        if all(g.store.complete[self.joined_blocks(g, row)].all() for g in self.token_groups):
            self.tables.joined[row] = 0
            return True
        return False

    # --- the prefix chain ---------------------------------------------------------------

    def record_chain(self, row: int, first: int, stop: int,
                     keys: np.ndarray | None = None) -> None:
        """Remember the keys of ``row``'s full blocks ``[first, stop)`` (computed from
        its known token ids unless given) and record the blocks in every group's
        prefix index."""
        if stop <= first:
            return
        t, bs = self.tables, self.block_size
        tokens = t.token_ids[row, first * bs:stop * bs].reshape(stop - first, bs)
        if keys is None:
            parent_key = int(t.chain_key[row, first - 1]) if first else \
                self.root_key(int(t.salt[row]))
            keys = self.hasher.keys(tokens, parent_key)
        t.chain_key[row, first:stop] = keys
        if self.link is not None:
            self.link.recorded(row, first, stop, keys)
        t.hashed[row] = stop
        salt = int(t.salt[row])
        for g in self.token_groups:
            blocks = g.table.blocks[row]
            physical = blocks[first:stop]
            parents = blocks[first - 1:stop - 1] if first else \
                np.concatenate([[ROOT], blocks[:stop - 1]])
            # A predecessor a sliding window gave back (-1 in the table) can never be
            # proven again; only the first block's parent is the root.
            parents = np.where(parents < 0, UNREACHABLE, parents)
            if first == 0:
                parents[0] = ROOT
            held = physical >= 0  # a sliding window may have released the oldest
            if not held.all():
                physical, parents = physical[held], parents[held]
                g.prefix.record(physical, keys[held], tokens[held], parents, salt)
            else:
                g.prefix.record(physical, keys, tokens, parents, salt)

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
        parent_keys = np.where(has_parent, t.chain_key[rows, prev], self.salts.roots[t.salt[rows]])
        keys = self.hasher.step(parent_keys, tokens)
        t.chain_key[rows, logical] = keys
        if self.link is not None:
            self.link.recorded_step(rows, logical, tokens, keys)
        t.hashed[rows] = logical + 1
        salts = t.salt[rows]
        for g in self.token_groups:
            blocks = g.table.blocks
            physical = blocks[rows, logical]
            before = blocks[rows, prev]
            parents = np.where(has_parent, np.where(before >= 0, before, UNREACHABLE), ROOT)
            g.prefix.record(physical, keys, tokens, parents, salts)

    # --- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Release every pool (main and swap) through the backend."""
        try:
            for g in self.groups:
                g.store.close()
        finally:
            if self.swap is not None:
                self.swap.close()
