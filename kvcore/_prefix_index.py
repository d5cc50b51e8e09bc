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

Which copy owns a key.  A lookup walks the chain from the root, so only a *reachable*
block registers: its parent is the root, or is registered under the key it had when
the block was recorded.  Any other could never be served, and would only keep a
reachable copy from registering.  The first reachable block recorded under a key
owns it, until

* a *copy* of the owner (the same parent, tokens and salt) becomes *complete* (K/V
  written for every layer) while the owner is not: the copy takes the key over, and
  the blocks recorded after the owner hang from the copy instead (the same content),
  so they stay reachable; or
* a reachable block is recorded under the key while the owner is not reachable any
  more: its parent lost its key (evicted, dropped unwritten, displaced) or holds
  something else now (its id reused), which the parent's generation, remembered
  when the owner was recorded, tells; the new block takes the key.

A recorded block that is freed before it is complete loses its key at once.  So an
aborted prefill never shadows a later, written copy of the same prompt, and no block
that has become unreachable keeps a key from one that is.  A displaced unreachable
owner is forgotten and handed to ``on_drop`` (the block pool makes a free one empty).

``complete`` is owned by the KV store (:mod:`kvcore._kv_store`) and ``writer`` (the
row filling each block, -1 once it gave the block back unwritten) by the group's
parts; the index only reads them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .errors import InvariantError

__all__ = ["PrefixIndex", "ROOT", "UNREACHABLE"]

#: The parent of a sequence's first block.
ROOT = -1
#: The parent of a block whose predecessor was already given back (a sliding window):
#: matches no block and not the root, so such a block is never reachable.
UNREACHABLE = -2
_EMPTY = np.zeros(0, dtype=np.int64)


class PrefixIndex:
    """Chain facts of recorded blocks and the key -> block map (see the module docstring)."""

    def __init__(self, num_blocks: int, block_size: int, complete: np.ndarray,
                 writer: np.ndarray | None = None) -> None:
        n = num_blocks
        self.block_size = block_size
        self._complete = complete
        self._writer = np.zeros(n, dtype=np.int64) if writer is None else writer
        self.key = np.zeros(n, dtype=np.uint64)
        #: Recorded: key, parent, salt and tokens below describe the block's content.
        self.recorded = np.zeros(n, dtype=bool)
        #: Registered: the block owns its key in the map.
        self.keyed = np.zeros(n, dtype=bool)
        self.parent = np.full(n, ROOT, dtype=np.int64)
        #: Each block's generation, moved on whenever what was recorded of it is dropped
        #: (evicted, freed unwritten, truncated, reset), and the parent's generation when
        #: a block was recorded: "same parent" means the same block *and* generation,
        #: so a block id reused for other content can never stand for the old one, even
        #: should every key collide.
        self.gen = np.zeros(n, dtype=np.int64)
        self.parent_gen = np.zeros(n, dtype=np.int64)
        self.salt = np.zeros(n, dtype=np.int64)
        self.tokens = np.zeros((n, block_size), dtype=np.int32)
        self._by_key: dict[int, int] = {}
        #: Called with blocks that lost their key to a reachable block (some may be
        #: free and cached: the pool turns those into empty blocks).
        self.on_drop: Callable[[np.ndarray], None] | None = None

    # --- queries ------------------------------------------------------------------

    def servable(self, blocks: np.ndarray) -> np.ndarray:
        """Per block: registered and complete, i.e. a lookup may hand it out."""
        return self.keyed[blocks] & self._complete[blocks]

    def __len__(self) -> int:
        """Registered blocks (the key map may also hold stale entries of dropped ones)."""
        return int(np.count_nonzero(self.keyed))

    def lookup(self, keys: np.ndarray, rows: np.ndarray, salt: int, *,
               pending: bool = False) -> np.ndarray:
        """The blocks of the longest leading run of ``keys`` (uint64) that the index
        proves identical to the query (``rows``: the blocks' token ids,
        ``[len(keys), bs]``).  Only complete blocks unless ``pending`` (joining a
        prefill in flight)."""
        get = self._by_key.get
        if not keys.size or get(int(keys[0])) is None:  # the usual miss: a prompt seen first
            return _EMPTY
        found = list(map(get, keys.tolist()))
        if None in found:
            found = found[:found.index(None)]
        blocks = np.array(found, dtype=np.int64)
        n = blocks.size
        parents = np.empty_like(blocks)
        parents[0] = ROOT
        parents[1:] = blocks[:-1]
        parent_gens = np.zeros_like(blocks)
        parent_gens[1:] = self.gen[blocks[:-1]]
        # The key map keeps stale entries of dropped blocks: a live owner is registered
        # under exactly this key.
        ok = (self.keyed[blocks] & (self.key[blocks] == keys[:n])
              & (self.parent[blocks] == parents) & (self.parent_gen[blocks] == parent_gens)
              & (self.salt[blocks] == salt) & (self.tokens[blocks] == rows[:n]).all(axis=1))
        # Joining a prefill in flight needs someone still to write it.
        ok &= self._complete[blocks] | (self._writer[blocks] >= 0) if pending \
            else self._complete[blocks]
        if not ok.all():
            blocks = blocks[:int(np.argmin(ok))]
        return blocks

    # --- changes ------------------------------------------------------------------

    def record(self, blocks: np.ndarray, keys: np.ndarray, rows: np.ndarray,
               parents: np.ndarray, salts: np.ndarray | int) -> None:
        """Record full blocks (chain facts) and register those that may own their key
        (see the module docstring)."""
        if not blocks.size:
            return
        self.key[blocks] = keys
        self.tokens[blocks] = rows
        self.parent[blocks] = parents
        # (UNREACHABLE reads some block's generation: meaningless, never looked at.)
        self.parent_gen[blocks] = np.where(parents == ROOT, 0, self.gen[parents])
        self.salt[blocks] = salts
        self.recorded[blocks] = True
        self._claim(blocks, fresh=True)

    def on_complete(self, blocks: np.ndarray) -> None:
        """``blocks`` just became complete: a recorded one whose key is held by an
        incomplete block takes the key over."""
        if blocks.size:
            waiting = blocks[self.recorded[blocks] & ~self.keyed[blocks]]
            if waiting.size:
                self._claim(waiting)

    def _claim(self, blocks: np.ndarray, *, fresh: bool = False) -> None:
        """Register the blocks that may own their key (see the module docstring); a
        sequence's blocks come in logical order, so a parent is settled before its
        children.  ``fresh``: recorded by this very call, so a parent registered just
        before (the usual case) is known to lead to its child without reading it."""
        by_key, keyed, complete, parent = self._by_key, self.keyed, self._complete, self.parent
        if fresh and self._claim_chain(blocks):
            return
        dropped = []
        last = ROOT  # the block registered just before
        for block, key, up in zip(blocks.tolist(), self.key[blocks].tolist(),
                                  parent[blocks].tolist()):
            if up == UNREACHABLE or not (up == ROOT or (fresh and up == last)
                                         or self._leads_here(up, block)):
                continue  # unreachable itself
            holder = by_key.get(key)
            if holder is not None and not (keyed[holder] and self.key[holder] == key):
                holder = None  # a stale entry of a dropped block
            if holder is not None:
                if holder == block:
                    continue
                hup = int(parent[holder])
                if hup != ROOT and not self._leads_here(hup, holder):
                    dropped.append(holder)  # unreachable: its parent lost its key
                elif not complete[holder] and complete[block] and self._is_copy(block, holder):
                    # Rare (two prefills of one prefix racing): a scan is fine.
                    children = self.recorded & (parent == holder) & \
                        (self.parent_gen == self.gen[holder])
                    parent[children] = block
                    self.parent_gen[children] = self.gen[block]
                else:
                    continue
                keyed[holder] = False
            by_key[key] = block
            keyed[block] = True
            last = block
        if len(by_key) > 4 * keyed.size:
            self._purge()
        if dropped:
            # Unreachable for good: forget what they held, so a free one goes back empty
            # with no chain facts a next owner could register under.
            gone = np.asarray(dropped, dtype=np.int64)
            self.recorded[gone] = False
            self.gen[gone] += 1
            if self.on_drop is not None:
                self.on_drop(gone)

    def _claim_chain(self, blocks: np.ndarray) -> bool:
        """The usual record: a new chain of blocks whose keys nobody holds, each the
        parent of the next, the first reachable.  Registers them all at once and says
        ``True``; ``False`` (nothing done) for anything else."""
        keys = self.key[blocks].tolist()
        if len(keys) > 1 and len(set(keys)) != len(keys):  # a key twice: the careful path
            return False
        by_key = self._by_key
        if not by_key.keys().isdisjoint(keys):  # some key is in the map: live or stale?
            for key in keys:
                holder = by_key.get(key)
                if holder is not None and self.keyed[holder] and self.key[holder] == key:
                    return False
        first = int(blocks[0])
        up = int(self.parent[first])
        if up == UNREACHABLE or not (up == ROOT or self._leads_here(up, first)):
            return False
        if blocks.size > 1 and not (self.parent[blocks[1:]] == blocks[:-1]).all():
            return False
        self._by_key.update(zip(keys, blocks.tolist()))
        self.keyed[blocks] = True
        if len(self._by_key) > 4 * self.keyed.size:
            self._purge()
        return True

    def _purge(self) -> None:
        """Drop the stale entries of the key map (amortised: once it holds 4x the pool)."""
        keyed, key = self.keyed, self.key
        self._by_key = {k: b for k, b in self._by_key.items() if keyed[b] and key[b] == k}

    def _leads_here(self, up: int, block: int) -> bool:
        """Whether ``up``, ``block``'s parent, is registered in the generation it had
        when ``block`` was recorded (so it still holds what ``block`` was computed
        after, and a lookup reaching ``up`` may go on to ``block``)."""
        return bool(self.keyed[up] and self.gen[up] == self.parent_gen[block])

    def _is_copy(self, block: int, other: int) -> bool:
        """Whether ``block`` holds what ``other`` holds (or will, once written): the
        same parent block (and generation), the same salt, the same token ids."""
        return bool(self.parent[block] == self.parent[other]
                    and self.parent_gen[block] == self.parent_gen[other]
                    and self.salt[block] == self.salt[other]
                    and np.array_equal(self.tokens[block], self.tokens[other]))

    def forget(self, blocks: np.ndarray) -> None:
        """``blocks`` no longer hold what was recorded (freed unwritten, evicted,
        overwritten): drop their keys and chain facts."""
        if not blocks.size:
            return
        # The key map's entries go stale (no dict work per block): every reader checks
        # the owner is still registered under the key.
        self.keyed[blocks] = False
        self.recorded[blocks] = False
        self.gen[blocks] += 1

    def reset(self) -> np.ndarray:
        """Drop every key: nothing recorded so far is served again (new model
        weights).  Returns the blocks that were registered."""
        registered = np.flatnonzero(self.keyed)
        self._by_key.clear()
        self.keyed[:] = False
        self.recorded[:] = False
        self.gen += 1
        return registered

    # --- checking -----------------------------------------------------------------

    def check(self) -> None:
        """Raise :class:`InvariantError` unless the map and the per-block facts agree."""
        keyed = np.flatnonzero(self.keyed)
        if np.unique(self.key[keyed]).size != keyed.size:
            raise InvariantError("two registered blocks share a key")
        for block in keyed.tolist():
            key = int(self.key[block])
            if self._by_key.get(key) != block:
                raise InvariantError(f"block {block} is registered under {key}, but the "
                                     f"map sends that key to {self._by_key.get(key)}")
        if (self.keyed & ~self.recorded).any():
            block = int(np.flatnonzero(self.keyed & ~self.recorded)[0])
            raise InvariantError(f"block {block} owns a key but has no recorded chain facts")
