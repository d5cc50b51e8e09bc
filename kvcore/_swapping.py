"""Moving a whole sequence to the swap pools and back, over every layer group, all or
nothing (the block-level moves are :class:`~kvcore._swap.SwapSpace`'s)."""

from __future__ import annotations

import numpy as np

from ._coordinator import Coordinator
from ._swap import SwapSpace
from .errors import OutOfBlocksError, UnsupportedError

__all__ = ["require_swap", "swap_in_sequence", "swap_out_sequence"]


def swap_out_sequence(co: Coordinator, row: int, request_id: str) -> None:
    """Move ``row``'s blocks of every group to the swap pools and release them; all
    or nothing.  The caller checked the sequence is resident and not joined to a
    prefill in flight."""
    swap = require_swap(co)
    held = [g.table.held(row).copy() for g in co.groups]
    for g, blocks in zip(co.groups, held):
        if blocks.size > swap.room(g.layout.index):
            co.counters.failures += 1
            raise OutOfBlocksError(f"swap_out of {request_id!r} needs {blocks.size} swap "
                                   f"blocks, {swap.room(g.layout.index)} are free")
    moved: list[np.ndarray] = []
    try:
        for g, blocks in zip(co.groups, held):  # each gives its blocks back on failure
            moved.append(swap.swap_out(g.store, g.layout.index, blocks))
    except BaseException:
        for g, dst in zip(co.groups, moved):
            swap.free(g.layout.index, dst)
        co.counters.failures += 1
        raise
    for g, blocks, dst in zip(co.groups, held, moved):
        g.release(blocks, by=row)
        g.table.blocks[row, int(g.table.released[row]):int(g.table.num_blocks[row])] = dst
    co.tables.swapped[row] = True


def swap_in_sequence(co: Coordinator, row: int, request_id: str) -> None:
    """Bring ``row`` back into fresh main blocks of every group, bit-identical; all or
    nothing (a failed transfer leaves it swapped out)."""
    swap = require_swap(co)
    t, bs = co.tables, co.block_size
    held = [g.table.held(row).copy() for g in co.groups]
    for g, src in zip(co.groups, held):
        if src.size > g.pool.num_free:
            co.counters.failures += 1
            raise OutOfBlocksError(f"swap_in of {request_id!r} needs {src.size} blocks, "
                                   f"{g.pool.num_free} are free")
    taken: list[np.ndarray] = []
    try:
        for g, src in zip(co.groups, held):
            taken.append(g.take(src.size, row))
            swap.swap_in(g.store, g.layout.index, src, taken[-1])
    except BaseException:
        for g, dst in zip(co.groups, taken):
            g.release(dst)
        co.counters.failures += 1
        raise
    for g, src, dst in zip(co.groups, held, taken):
        swap.free(g.layout.index, src)
        first = int(g.table.released[row])
        g.table.blocks[row, first:int(g.table.num_blocks[row])] = dst
        # The copies are written wherever the sequence was written.
        ends = (np.arange(first, first + dst.size) + 1) * bs
        written = t.written[row, list(g.layout.layers)]
        g.store.filled[dst] = ends[:, None] <= written[None, :]
        g.store.complete[dst] = g.store.filled[dst].all(axis=1)
    t.swapped[row] = False
    t.joined[row] = 0


def require_swap(co: Coordinator) -> SwapSpace:
    if co.swap is None:
        raise UnsupportedError("this manager has no swap pool: set CacheConfig.swap_blocks")
    return co.swap
