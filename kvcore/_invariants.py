"""The consistency checks behind :meth:`KvCacheManager.check_invariants`.

Tests call them after every operation; they are O(pool size), so engines should not.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import numpy as np

from ._block_pool import BlockPool
from ._sequence import _Sequence
from .errors import InvariantError

__all__ = ["check_manager"]


def check_manager(pool: BlockPool, swap_pool: BlockPool | None,
                  seqs: Mapping[str, _Sequence], written: np.ndarray, block_size: int) -> None:
    """Raise :class:`InvariantError` at the first inconsistency found."""
    holders: Counter[int] = Counter()
    swap_holders: Counter[int] = Counter()
    for rid, seq in seqs.items():
        blocks = seq.table._blocks
        length = seq.table._length
        if not seq.valid:
            raise InvariantError(f"request {rid!r} is registered but marked invalid")
        if len(set(blocks)) != len(blocks):
            raise InvariantError(f"request {rid!r} holds a block twice: {blocks}")
        if len(blocks) != -(-length // block_size):
            raise InvariantError(f"request {rid!r} has {len(blocks)} blocks for {length} "
                                 f"tokens of block size {block_size}")
        if np.any(written[seq.row] > length):
            raise InvariantError(f"request {rid!r} has more tokens written "
                                 f"({written[seq.row].max()}) than it holds ({length})")
        if seq.swap_blocks is not None:
            swap_holders.update(blocks)
            continue
        holders.update(blocks)
        # Blocks past private_from are not shared by a fork.  A prefix-cached block may
        # still be shared through a prefix hit: it is only ever filled once and copied
        # before any overwrite, so its owner need not know.
        for i in range(seq.private_from, len(blocks)):
            if pool.ref[blocks[i]] != 1 and not pool.is_cached(blocks[i]):
                raise InvariantError(f"request {rid!r} treats block {blocks[i]} (logical {i}) "
                                     f"as private but its refcount is {pool.ref[blocks[i]]}")
    pool.check(holders)
    if swap_pool is not None:
        swap_pool.check(swap_holders)
    elif swap_holders:
        raise InvariantError("sequences are swapped out but there is no swap pool")
