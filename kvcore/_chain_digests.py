"""ChainDigests: the keyed cryptographic chain key of every full block a manager records.

The in-process prefix keys (:mod:`kvcore._chain_hash`) are fast, 64-bit and only find
candidates; keys that leave the process must be cryptographic (issue 10).  With a
store, or ``CacheConfig.crypto_block_keys``, every full block recorded in the prefix
chain also gets its 16-byte keyed BLAKE2b chain key
(:func:`kvcore.stores.chain_keys`: over the parent's key, the block's int32 token ids
and the extra key), computed once, when the block is recorded:

* per sequence, in ``SequenceTables.digest[row, i]``, valid for ``i < hashed[row]``
  (so a chain continues from its last digest, and a fork inherits them);
* per physical block of the (only) layer group, when a store is attached, with the
  block's in-process key and prefix-index generation at that moment: a block's digest
  is *known* only while the prefix index still holds exactly what was recorded
  (recorded, same generation, same key).  A block truncated, evicted, reused or
  dropped since is not known, so nothing can be offered under a stale digest.

Only rows that complete a block pay (one BLAKE2b call per block, about 0.5 us for 16
tokens; chaining makes it sequential per sequence).  A prompt's digests are computed
once per ``allocate``: those of local prefix hits are read back from the blocks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from ._sequence_table import DIGEST_DTYPE
from .stores._keys import DIGEST_SIZE, ROOT_PARENT, ChainKeyer, extra_bytes

if TYPE_CHECKING:
    from ._coordinator import Coordinator

__all__ = ["ChainDigests", "as_digest_array"]


def as_digest_array(digests: list[bytes]) -> np.ndarray:
    """``digests`` (16 bytes each) as a ``V16`` array."""
    return np.frombuffer(b"".join(digests), dtype=DIGEST_DTYPE)


class _Stash(NamedTuple):
    """The digests ``allocate`` computed for a prompt, for the recording that follows."""

    salt: int
    tokens: np.ndarray  # [full, block_size] int32
    digests: np.ndarray  # [full] V16


class ChainDigests:
    """Keyed chain keys of recorded full blocks (see the module docstring)."""

    def __init__(self, co: Coordinator, hash_key: bytes, *, per_block: bool) -> None:
        self._co = co
        self._keyer = ChainKeyer(hash_key)
        #: Whether physical blocks remember their digests (a store is attached).
        self.per_block = per_block
        n = co.groups[0].layout.num_blocks if per_block else 0
        self.block_digest = np.zeros(n, dtype=DIGEST_DTYPE)
        self.block_key = np.zeros(n, dtype=np.uint64)
        self.block_gen = np.full(n, -1, dtype=np.int64)
        self._stash: _Stash | None = None

    def _extra(self, salt: int) -> bytes:
        # Looked up each time, never cached by id: salt ids are reused once freed
        # (kvcore._salts), and a stale cache would key one tenant's blocks as another's.
        return extra_bytes(self._co.extra_key(salt))

    # --- recording (the coordinator's BlockLink hooks call these) ---------------------

    def recorded(self, row: int, first: int, stop: int, keys: np.ndarray) -> None:
        """Blocks ``[first, stop)`` of ``row`` were recorded (their token ids and salt
        are in the tables; ``digest[row, :first]`` is valid, or is about to be written
        from the stash of the ``allocate`` that records them)."""
        co = self._co
        t, bs = co.tables, co.block_size
        stash = self._stash
        if stash is not None and self._matches(stash, row, stop):
            t.digest[row, :stop] = stash.digests[:stop]
        else:
            parent = t.digest[row, first - 1].tobytes() if first else ROOT_PARENT
            tokens = t.token_ids[row, first * bs:stop * bs].reshape(stop - first, bs)
            digests = self._keyer.chain(parent, tokens, self._extra(int(t.salt[row])))
            t.digest[row, first:stop] = as_digest_array(digests)
        if self.per_block:
            self._remember(co.groups[0].table.blocks[row, first:stop],
                           t.digest[row, first:stop], keys)

    def recorded_step(self, rows: np.ndarray, logical: np.ndarray, tokens: np.ndarray,
                      keys: np.ndarray) -> None:
        """Each of ``rows`` recorded one more block, at ``logical`` (a decode step)."""
        co = self._co
        t = co.tables
        parents = t.digest[rows, np.maximum(logical - 1, 0)]
        first = logical == 0
        if first.any():
            parents[first] = np.frombuffer(ROOT_PARENT, dtype=DIGEST_DTYPE)[0]
        raw = parents.tobytes()
        size = DIGEST_SIZE
        parent_list = [raw[i:i + size] for i in range(0, len(raw), size)]
        extras = [self._extra(s) for s in t.salt[rows].tolist()]
        digests = as_digest_array(self._keyer.steps(parent_list, tokens, extras))
        t.digest[rows, logical] = digests
        if self.per_block:
            self._remember(co.groups[0].table.blocks[rows, logical], digests, keys)

    def _remember(self, blocks: np.ndarray, digests: np.ndarray, keys: np.ndarray) -> None:
        held = blocks >= 0
        if not held.all():
            blocks, digests, keys = blocks[held], digests[held], keys[held]
        self.block_digest[blocks] = digests
        self.block_key[blocks] = keys
        self.block_gen[blocks] = self._co.groups[0].prefix.gen[blocks]

    def _matches(self, stash: _Stash, row: int, stop: int) -> bool:
        """Whether the stash holds the digests of ``row``'s first ``stop`` blocks: the
        same salt and the same token ids (a digest is a function of nothing else)."""
        t, bs = self._co.tables, self._co.block_size
        return (stash.salt == int(t.salt[row]) and stop <= stash.tokens.shape[0]
                and np.array_equal(t.token_ids[row, :stop * bs], stash.tokens[:stop].ravel()))

    # --- reading ----------------------------------------------------------------------

    def known(self, blocks: np.ndarray) -> np.ndarray:
        """Per block: its digest is known, and the prefix index still holds exactly
        what it was recorded for."""
        prefix = self._co.groups[0].prefix
        return (prefix.recorded[blocks] & (prefix.gen[blocks] == self.block_gen[blocks])
                & (prefix.key[blocks] == self.block_key[blocks]))

    def prompt(self, tokens: np.ndarray, salt: int, hits: np.ndarray | None) -> np.ndarray:
        """The digests of a prompt's full blocks (``tokens``: ``[full, block_size]``),
        kept for the recording of the ``allocate`` that follows.  ``hits`` are the
        prompt's leading local prefix hits (proven identical by the prefix index), whose
        digests are read back instead of computed."""
        self._stash = None
        h = 0 if hits is None or not self.per_block else hits.size
        if h and self.known(hits).all():
            head = self.block_digest[hits]
            tail = self._keyer.chain(head[-1].tobytes(), tokens[h:], self._extra(salt))
            digests = np.concatenate([head, as_digest_array(tail)]) if tail else head.copy()
        else:
            digests = as_digest_array(self._keyer.chain(ROOT_PARENT, tokens, self._extra(salt)))
        self._stash = _Stash(salt, tokens, digests)
        return digests

    def forget_stash(self) -> None:
        self._stash = None

    def of_row(self, row: int) -> list[bytes]:
        """The digests of ``row``'s recorded full blocks, in order."""
        raw = self._co.tables.digest[row, :int(self._co.tables.hashed[row])].tobytes()
        return [raw[i:i + DIGEST_SIZE] for i in range(0, len(raw), DIGEST_SIZE)]
