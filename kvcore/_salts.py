"""SaltRegistry: the small integer id and chain root of every live ``extra_key``.

Tables and the prefix index store a salt as an int64 id (so chain checks compare
integers, vectorised); this registry maps ``extra_key`` strings to those ids and
keeps each id's chain root (:meth:`ChainHasher.root`) in an array, so a decode step
looks the roots of a whole batch up in one indexing call.

A server that gives every user or conversation its own salt sees an unbounded
stream of distinct strings, so ids are reclaimed: when the registry has doubled
since it last looked, it asks its owner which ids are still referenced (by a
sequence row or by a recorded block) and frees the rest for reuse.  A freed id is
referenced nowhere, so handing it to another string cannot make two salts compare
equal.  Memory is bounded by the live salts, and the cost of a reclaim is paid once
per doubling: constant per new salt, amortised.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ._chain_hash import ChainHasher

__all__ = ["SaltRegistry"]

#: Reclaim no earlier than this many distinct salts (a small server never pays).
_FIRST_RECLAIM = 64


class SaltRegistry:
    """``extra_key`` -> salt id, and each id's chain root (see the module docstring).

    ``in_use`` returns the ids still referenced (any iterable of ints or an int
    array); id 0, the salt of ``extra_key=None``, is never freed."""

    def __init__(self, hasher: ChainHasher, in_use: Callable[[], np.ndarray]) -> None:
        self._hasher = hasher
        self._in_use = in_use
        self._ids: dict[str | None, int] = {None: 0}
        self._names: dict[int, str | None] = {0: None}
        self._roots = np.zeros(8, dtype=np.uint64)
        self._roots[0] = hasher.root(None)
        self._next = 1           # ids [1, _next) have been handed out at least once
        self._free: list[int] = []
        self._reclaim_at = _FIRST_RECLAIM

    def __len__(self) -> int:
        """Distinct salts held (``None`` included)."""
        return len(self._ids)

    @property
    def roots(self) -> np.ndarray:
        """Chain root per salt id (a view: index it with an array of ids)."""
        return self._roots

    def id(self, extra_key: str | None) -> int:
        """The salt id of ``extra_key``, registering it if new."""
        sid = self._ids.get(extra_key)
        if sid is not None:
            return sid
        if len(self._ids) >= self._reclaim_at:
            self.reclaim()
        if self._free:
            sid = self._free.pop()
        else:
            sid = self._next
            self._next += 1
            if sid >= self._roots.size:
                grown = np.zeros(2 * self._roots.size, dtype=np.uint64)
                grown[:self._roots.size] = self._roots
                self._roots = grown
        self._roots[sid] = self._hasher.root(extra_key)
        self._ids[extra_key] = sid
        self._names[sid] = extra_key
        return sid

    def root(self, sid: int) -> int:
        return int(self._roots[sid])

    def name(self, sid: int) -> str | None:
        """The ``extra_key`` of a live id (ids are reused once freed: never keep a
        name or anything derived from it by id)."""
        return self._names[sid]

    def reclaim(self) -> int:
        """Free the ids nothing references any more; returns how many were freed."""
        live = np.zeros(self._next, dtype=bool)
        live[np.asarray(self._in_use(), dtype=np.int64)] = True
        live[0] = True
        stale = [key for key, sid in self._ids.items() if not live[sid]]
        for key in stale:
            sid = self._ids.pop(key)
            del self._names[sid]
            self._free.append(sid)
        self._reclaim_at = max(_FIRST_RECLAIM, 2 * len(self._ids))
        return len(stale)
