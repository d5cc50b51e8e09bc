"""Faults planted (by monkeypatching) to prove the trust tests fail when the core
loses one of its safety checks: test_differential.py and test_prefix_collisions.py."""

from __future__ import annotations

import numpy as np

__all__ = ["allow_every_write", "constant_key", "lookup_own_tokens_only", "own_tokens_key"]


def allow_every_write(*args):
    """``writable(rows, blocks, first)`` (as a method or a function) answering "in
    place" for every block."""
    blocks = args[-2]
    return np.ones(np.shape(blocks), dtype=bool)


def constant_key(self, blocks, parent=None):
    """Every block on one key, whatever its tokens, parent or salt."""
    return np.full(blocks.shape[0], 7, dtype=np.uint64)


def own_tokens_key(self, blocks, parent=None):
    """A weak key: the block's own token ids only, no parent, no salt."""
    return blocks.astype(np.uint64) @ self._weights


def lookup_own_tokens_only(self, keys, rows, salt, *, pending=False):
    """The old verification: a candidate's own token ids, not its parent or salt."""
    get = self._by_key.get
    keys = [int(k) for k in keys]  # the index takes a uint64 array
    if not keys or get(keys[0]) is None:
        return np.zeros(0, dtype=np.int64)
    found = list(map(get, keys))
    if None in found:
        found = found[:found.index(None)]
    if len(set(found)) < len(found):  # a block once per table, whatever the key says
        found = found[:next(i for i, b in enumerate(found) if b in found[:i])]
    blocks = np.array(found, dtype=np.int64)
    ok = (self.tokens[blocks] == rows[:blocks.size]).all(axis=1)
    if not pending:
        ok &= self._complete[blocks]
    return blocks[:int(np.argmin(ok))] if not ok.all() else blocks
