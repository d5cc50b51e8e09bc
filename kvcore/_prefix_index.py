"""PrefixIndex: which blocks hold K/V a new sequence may share, and the proof.

Every full block of a sequence whose token ids are known is *recorded* here: its
chain key (:mod:`kvcore._chain_hash`), its token ids, its salt (``extra_key``) and
its *parent*, the physical block that held the previous block of the same sequence
when it was recorded (``ROOT`` for the first).  A recorded block is *registered*
when it owns its key in the key -> block map; one key maps to one block.

A lookup finds candidates by key, then **accepts block ``i`` only if its recorded
parent is exactly the block accepted at ``i - 1``** (the root for ``i = 0``), its
token ids equal the query's and its salt is the query's.  The whole chain is thereby
proven identical, so two different prefixes can share a key (a collision, crafted or
not) and cost a miss, never data.  Checks are vectorised over the run of candidates.

A parent is a physical block id, and ids are reused.  So each block also has a
*generation*, moved on whenever it stops holding what was recorded of it
(:meth:`PrefixIndex.forget`: evicted, freed unwritten, truncated, reset), and a
child records its parent's generation with its id: a child that outlived its parent
(a fork copied the parent and kept the child) is never vouched for by the chain that
reuses the parent's id.

Which copy owns a key: the first block recorded under it, until a block recorded
under the same key becomes *complete* (K/V written for every layer) while the owner
is not; then the complete one takes the key over.  A recorded block that is freed
before it is complete loses its key at once.  So an aborted prefill never shadows a
later, written copy of the same prompt.

``complete`` is owned by the KV store (:mod:`kvcore._kv_store`); the index only reads it.
"""

from __future__ import annotations

import numpy as np

from .errors import InvariantError

__all__ = ["PrefixIndex", "ROOT", "UNREACHABLE"]

#: The parent of a sequence's first block.
ROOT = -1
#: The parent of a block whose predecessor was already given back (a sliding window):
#: matches no block and not the root, so such a block is never accepted by a lookup.
UNREACHABLE = -2
_EMPTY = np.zeros(0, dtype=np.int64)


class PrefixIndex:
    """Chain facts of recorded blocks and the key -> block map (see the module docstring)."""

    def __init__(self, num_blocks: int, block_size: int, complete: np.ndarray) -> None:
        n = num_blocks
        self.block_size = block_size
        self._complete = complete
        self.key = np.zeros(n, dtype=np.uint64)
        #: Recorded: key, parent, salt and tokens below describe the block's content.
        self.recorded = np.zeros(n, dtype=bool)
        #: Registered: the block owns its key in the map.
        self.keyed = np.zeros(n, dtype=bool)
        self.parent = np.full(n, ROOT, dtype=np.int64)
        #: Moves on when a block stops holding what was recorded; a child records its
        #: parent's generation with the parent's id.
        self.generation = np.zeros(n, dtype=np.int64)
        self.parent_generation = np.zeros(n, dtype=np.int64)
        self.salt = np.zeros(n, dtype=np.int64)
        self.tokens = np.zeros((n, block_size), dtype=np.int32)
        self._by_key: dict[int, int] = {}

    # --- queries ------------------------------------------------------------------

    def servable(self, blocks: np.ndarray) -> np.ndarray:
        """Per block: registered and complete, i.e. a lookup may hand it out."""
        return self.keyed[blocks] & self._complete[blocks]

    def __len__(self) -> int:
        return len(self._by_key)

    def lookup(self, keys: list[int], rows: np.ndarray, salt: int, *,
               pending: bool = False) -> np.ndarray:
        """The blocks of the longest leading run of ``keys`` that the index proves
        identical to the query (``rows``: the blocks' token ids, ``[len(keys), bs]``).
        Only complete blocks unless ``pending`` (joining a prefill in flight)."""
        get = self._by_key.get
        if not keys or get(keys[0]) is None:  # the usual miss: a prompt seen first
            return _EMPTY
        found = list(map(get, keys))
        if None in found:
            found = found[:found.index(None)]
        blocks = np.array(found, dtype=np.int64)
        parents = np.empty_like(blocks)
        parents[0] = ROOT
        parents[1:] = blocks[:-1]
        ok = ((self.parent[blocks] == parents) & (self.salt[blocks] == salt)
              & (self.tokens[blocks] == rows[:blocks.size]).all(axis=1))
        ok[1:] &= self.parent_generation[blocks[1:]] == self.generation[blocks[:-1]]
        if not pending:
            ok &= self._complete[blocks]
        if not ok.all():
            blocks = blocks[:int(np.argmin(ok))]
        return blocks

    # --- changes ------------------------------------------------------------------

    def record(self, blocks: np.ndarray, keys: np.ndarray, rows: np.ndarray,
               parents: np.ndarray, salts: np.ndarray | int) -> None:
        """Record full blocks (chain facts) and register each whose key is free, or
        held by an incomplete block while this one is complete."""
        if not blocks.size:
            return
        self.key[blocks] = keys
        self.tokens[blocks] = rows
        self.parent[blocks] = parents
        self.parent_generation[blocks] = np.where(
            np.asarray(parents) == ROOT, 0, self.generation[np.maximum(parents, 0)])
        self.salt[blocks] = salts
        self.recorded[blocks] = True
        self._claim(blocks)

    def on_complete(self, blocks: np.ndarray) -> None:
        """``blocks`` just became complete: a recorded one whose key is held by an
        incomplete block takes the key over."""
        if blocks.size:
            waiting = blocks[self.recorded[blocks] & ~self.keyed[blocks]]
            if waiting.size:
                self._claim(waiting)

    def _claim(self, blocks: np.ndarray) -> None:
        """Register the blocks that may own their key.  A displaced holder is always
        incomplete, hence in use (a block freed before completion loses its key at
        once), so no free cached block is ever displaced."""
        by_key, keyed, complete = self._by_key, self.keyed, self._complete
        for block, key in zip(blocks.tolist(), self.key[blocks].tolist()):
            holder = by_key.get(key)
            if holder is None:
                by_key[key] = block
                keyed[block] = True
            elif holder != block and not complete[holder] and complete[block]:
                by_key[key] = block
                keyed[block] = True
                keyed[holder] = False

    def forget(self, blocks: np.ndarray) -> None:
        """``blocks`` no longer hold what was recorded (freed unwritten, evicted,
        overwritten): drop their keys and chain facts."""
        if not blocks.size:
            return
        self.generation[blocks] += 1  # children recorded under what it held are orphans
        keyed = blocks[self.keyed[blocks]]
        if keyed.size:
            by_key = self._by_key
            for key in self.key[keyed].tolist():
                del by_key[key]
            self.keyed[keyed] = False
        self.recorded[blocks] = False

    def reset(self) -> np.ndarray:
        """Drop every key: nothing recorded so far is served again (new model
        weights).  Returns the blocks that were registered."""
        registered = np.flatnonzero(self.keyed)
        self.generation[self.recorded] += 1
        self._by_key.clear()
        self.keyed[:] = False
        self.recorded[:] = False
        return registered

    # --- checking -----------------------------------------------------------------

    def check(self) -> None:
        """Raise :class:`InvariantError` unless the map and the per-block facts agree."""
        keyed = np.flatnonzero(self.keyed)
        if len(self._by_key) != keyed.size:
            raise InvariantError(f"the key map holds {len(self._by_key)} keys but "
                                 f"{keyed.size} blocks are registered")
        for block in keyed.tolist():
            key = int(self.key[block])
            if self._by_key.get(key) != block:
                raise InvariantError(f"block {block} is registered under {key}, but the "
                                     f"map sends that key to {self._by_key.get(key)}")
        if (self.keyed & ~self.recorded).any():
            block = int(np.flatnonzero(self.keyed & ~self.recorded)[0])
            raise InvariantError(f"block {block} owns a key but has no recorded chain facts")
