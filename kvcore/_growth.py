"""How sequences get and give up room: allocation (with prefix hits), extension by
a decode step or a chunk, sliding windows giving back what they no longer need, and
truncation.

Each operation is split into a *plan*, which checks everything and changes nothing,
and a *commit*, which cannot fail: a refused request leaves every part exactly as it
was, in every layer group.  A decode step for a whole batch is a fixed number of
array operations per group (slots, new blocks, copy-on-write, the prefix chain),
whatever the batch size.

When groups disagree about a prompt's prefix hit, the hit is the shortest: every
group must serve the same leading blocks (a sliding-window group needs only the
blocks inside the window before the first token it computes, but proving them needs
the whole chain still cached in that group; see docs/layer-groups.md).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

from ._chain_hash import token_array
from ._coordinator import Coordinator, GroupParts
from .errors import CapacityError, OutOfBlocksError
from .models import AllocationRequest, GroupKind

__all__ = ["AllocationPlan", "commit_allocation", "extend_rows", "plan_allocation",
           "truncate_row"]

_EMPTY = np.zeros(0, dtype=np.int64)


class GroupPlan(NamedTuple):
    #: Cached blocks taken (prefix hits the sequence keeps).
    acquire: np.ndarray
    #: Fresh blocks to take.
    fresh: int
    #: Leading logical blocks not held (outside a sliding window from the start).
    released: int
    #: Logical blocks in the table.
    blocks: int


class AllocationPlan(NamedTuple):
    #: Leading prompt blocks served from the prefix cache.
    hits: int
    groups: list[GroupPlan]
    #: Whether some hits are still being written (joined prefill).
    pending: bool
    #: The prompt's token ids (int32) and the keys of its full blocks, or ``None``.
    tokens: np.ndarray | None
    keys: np.ndarray | None
    salt: int
    encoder_tokens: int

    def room_needed(self, co: Coordinator) -> list[tuple[int, int]]:
        """Per group: (new blocks needed, blocks free for them)."""
        out = []
        for g, plan in zip(co.groups, self.groups):
            out.append((plan.fresh, g.pool.num_free - g.pool.count_free(plan.acquire)))
        return out

    def fits(self, co: Coordinator) -> bool:
        return all(need <= free for need, free in self.room_needed(co))


def _encoder_tokens(co: Coordinator, request: AllocationRequest) -> int:
    wanted = request.encoder_tokens
    if not co.cross_groups:
        if wanted:
            raise CapacityError(f"encoder_tokens={wanted} was given but the cache has no "
                                "cross-attention layer group")
        return 0
    most = min(g.layout.encoder_tokens or 0 for g in co.cross_groups)
    if wanted is None:
        return most
    if wanted > most:
        raise CapacityError(f"encoder_tokens={wanted} exceeds the cross-attention group's "
                            f"encoder_tokens={most}")
    return wanted


def plan_allocation(co: Coordinator, request: AllocationRequest) -> AllocationPlan:
    """What allocating ``request`` would take, in every group.  Changes nothing."""
    n = request.num_tokens or 0
    bs = co.block_size
    total = -(-n // bs)
    salt = co.salt(request.extra_key)
    encoder = _encoder_tokens(co, request)
    tokens = request.token_array()
    keys = None
    found: list[np.ndarray] = [_EMPTY] * len(co.groups)
    hits = 0
    if tokens is not None and co.config.enable_prefix_caching and co.token_groups:
        full = n // bs
        rows = tokens[:full * bs].reshape(full, bs)
        keys = co.hasher.keys(rows, co.root_key(salt))
        # vLLM's rule: the block holding the last prompt token is computed, not served,
        # so the engine always runs at least one token and gets its logits.
        limit = full if request.allow_full_hit else max(0, (n - 1) // bs)
        for g in co.token_groups:
            found[g.layout.index] = g.prefix.lookup(keys[:limit], rows[:limit], salt,
                                                    pending=request.join_pending)
        hits = min(found[g.layout.index].size for g in co.token_groups)
    plans = []
    pending = False
    for g in co.groups:
        if not g.token_based:
            plans.append(GroupPlan(_EMPTY, -(-encoder // bs), 0, -(-encoder // bs)))
            continue
        released = 0
        if g.kind is GroupKind.sliding and hits:
            # The first computed token, at position hits * bs, reads back `window`.
            released = max(0, (hits * bs - g.window + 1) // bs)  # type: ignore[operator]
        acquire = found[g.layout.index][released:hits]
        pending = pending or (acquire.size > 0 and not g.store.complete[acquire].all())
        plans.append(GroupPlan(acquire, total - hits, released, total))
    return AllocationPlan(hits, plans, pending, tokens, keys, salt, encoder)


def commit_allocation(co: Coordinator, plan: AllocationPlan, row: int, n: int) -> None:
    """Give ``row`` the plan's blocks in every group.  The caller checked there is
    room."""
    t, bs = co.tables, co.block_size
    for g, gp in zip(co.groups, plan.groups):
        g.pool.acquire(gp.acquire)
        fresh = g.take(gp.fresh, row)
        table = g.table
        table.ensure_width(gp.blocks)
        table.blocks[row, gp.released:gp.blocks] = np.concatenate([gp.acquire, fresh]) \
            if gp.acquire.size else fresh
        table.num_blocks[row] = gp.blocks
        table.released[row] = gp.released
    cached = plan.hits * bs
    t.length[row] = n
    t.cached[row] = cached
    for g in co.token_groups:
        t.written[row, list(g.layout.layers)] = cached
    t.encoder[row] = plan.encoder_tokens
    t.joined[row] = plan.hits if plan.pending else 0
    t.salt[row] = plan.salt
    t.last_access[row] = time.time()
    c = co.counters
    c.allocations += 1
    if plan.tokens is not None:
        t.ensure_chain_width(-(-n // bs))
        t.token_ids[row, :n] = plan.tokens
        t.known[row] = n
    if plan.keys is not None:
        h, full = plan.hits, plan.keys.size
        t.hashing[row] = True
        t.chain_key[row, :h] = plan.keys[:h]
        t.hashed[row] = h
        co.record_chain(row, h, full, plan.keys[h:])
        c.queries += full
        c.hits += h
        c.query_tokens += n
        c.hit_tokens += cached
    if plan.hits:
        co.epoch += 1  # blocks other sequences write may now be shared


def _check_token_ids(token_ids: object, count: int, n: int) -> np.ndarray:
    """``token_ids`` (one sequence of ``n`` ids per sequence of the batch) as an int32
    ``[count, n]`` array; typed errors name the entry at fault."""
    if isinstance(token_ids, np.ndarray):
        if token_ids.shape != (count, n):
            raise ValueError(f"token_ids has shape {list(token_ids.shape)}, expected "
                             f"[{count}, {n}] (one row of num_tokens ids per sequence)")
        return token_array(token_ids.reshape(-1), "token_ids").reshape(count, n)
    if isinstance(token_ids, (str, bytes)) or not hasattr(token_ids, "__len__"):
        raise TypeError(f"token_ids must be one sequence of token ids per sequence, got "
                        f"{type(token_ids).__name__}")
    if len(token_ids) != count:  # type: ignore[arg-type]
        raise ValueError(f"token_ids has {len(token_ids)} entries for "  # type: ignore[arg-type]
                         f"{count} sequences")
    lengths = [len(ids) if hasattr(ids, "__len__") and not isinstance(ids, (str, bytes))
               else -1 for ids in token_ids]  # type: ignore[attr-defined]
    if lengths.count(n) == count:
        flat = [t for ids in token_ids for t in ids]  # type: ignore[attr-defined]
        if set(map(type, flat)) <= {int}:  # the common case: checked in bulk
            return token_array(flat, "token_ids").reshape(count, n)
    out = np.empty((count, n), dtype=np.int32)  # name the entry at fault
    for i, ids in enumerate(token_ids):  # type: ignore[attr-defined]
        row = token_array(ids, f"token_ids[{i}]")
        if row.shape[0] != n:
            raise ValueError(f"token_ids[{i}] has {row.shape[0]} ids for num_tokens={n}")
        out[i] = row
    return out


def _grow_group(co: Coordinator, g: GroupParts, rows: np.ndarray, lengths: np.ndarray,
                n: int, steady: bool) -> np.ndarray:
    """Give each row room for ``n`` more tokens in group ``g``; returns the new tokens'
    slots.  The caller checked there is room (see :func:`_need`)."""
    table, bs = g.table, co.block_size
    nb = table.num_blocks[rows]
    if n == 1 and steady:
        # The decode step: a row needs a new block exactly when its last one is full.
        full = lengths % bs == 0
        if full.any():
            growing = rows[full]
            column = nb[full]
            table.ensure_width(int(column.max()) + 1)
            table.blocks[growing, column] = g.take(growing.size, growing)
            table.num_blocks[growing] += 1
        return table.blocks[rows, lengths // bs] * bs + lengths % bs
    new_len = lengths + n
    grow = -(-new_len // bs) - nb
    last = table.blocks[rows, np.maximum(nb - 1, 0)]  # only read where lengths % bs != 0
    cow = (lengths % bs != 0) & (g.pool.ref[last] > 1)
    if cow.any():
        cow_rows = rows[cow]
        src = last[cow]
        dst = g.take(cow_rows.size, cow_rows)
        g.store.copy_blocks(src, dst)
        table.blocks[cow_rows, nb[cow] - 1] = dst
        g.release(src, unique=False, by=cow_rows)
        co.counters.cow += cow_rows.size
        co.tables.version[cow_rows] += 1
        co.epoch += 1
    if grow.any():
        growing = grow > 0
        g_rows, g_counts = rows[growing], grow[growing]
        fresh = g.take(int(g_counts.sum()), np.repeat(g_rows, g_counts))
        table.ensure_width(int((nb + grow).max()))
        first = np.repeat(nb[growing], g_counts)
        within = np.arange(fresh.size) - np.repeat(np.cumsum(g_counts) - g_counts, g_counts)
        table.blocks[np.repeat(g_rows, g_counts), first + within] = fresh
        table.num_blocks[g_rows] += g_counts
    if n == 1:
        return table.blocks[rows, lengths // bs] * bs + lengths % bs
    pos = lengths[:, None] + np.arange(n)
    return (table.blocks[rows[:, None], pos // bs] * bs + pos % bs).reshape(-1)


def _need(co: Coordinator, g: GroupParts, rows: np.ndarray, lengths: np.ndarray, n: int,
          steady: bool) -> int:
    """Blocks group ``g`` must take to grow ``rows`` by ``n`` tokens."""
    bs, table = co.block_size, g.table
    if n == 1 and steady:
        return int(np.count_nonzero(lengths % bs == 0))
    nb = table.num_blocks[rows]
    grow = -(-(lengths + n) // bs) - nb
    last = table.blocks[rows, np.maximum(nb - 1, 0)]
    cow = (lengths % bs != 0) & (g.pool.ref[last] > 1)
    return int(grow.sum()) + int(np.count_nonzero(cow))


def _slide(co: Coordinator, g: GroupParts, rows: np.ndarray, starts: np.ndarray) -> None:
    """Give back the blocks of a sliding group that no query from ``starts`` on reads:
    wholly before ``start - window + 1``."""
    table, bs = g.table, co.block_size
    keep_from = (starts - g.window + 1) // bs  # type: ignore[operator]
    moving = keep_from > table.released[rows]
    if not moving.any():
        return
    rows, keep_from = rows[moving], keep_from[moving]
    old = table.released[rows]
    counts = keep_from - old
    cols = np.repeat(old, counts) + (np.arange(int(counts.sum()))
                                     - np.repeat(np.cumsum(counts) - counts, counts))
    where = np.repeat(rows, counts)
    blocks = table.blocks[where, cols]
    table.blocks[where, cols] = -1
    table.released[rows] = keep_from
    g.release(blocks, unique=False, by=where)  # forks of one sequence give back the same block
    co.counters.window_releases += blocks.size


def extend_rows(co: Coordinator, rows: np.ndarray, n: int, token_ids: object | None, *,
                steady: bool = False) -> tuple[list[np.ndarray | None], np.ndarray]:
    """Grow each of ``rows`` (distinct, live, resident) by ``n`` tokens.  Returns, per
    group, the slots of the new tokens (sequences in order; ``None`` for
    cross-attention groups, which do not grow), and the starting positions.  All or
    nothing.  ``steady`` says nothing was shared since these rows were last checked
    (same batch, same epoch), so no last block needs copy-on-write."""
    t = co.tables
    ids = None if token_ids is None else _check_token_ids(token_ids, rows.size, n)
    lengths = t.length[rows]
    for g in co.token_groups:
        need = _need(co, g, rows, lengths, n, steady)
        if need > g.pool.num_free:
            co.counters.failures += 1
            raise OutOfBlocksError(f"extending {rows.size} sequence(s) by {n} tokens needs "
                                   f"{need} blocks but only {g.pool.num_free} are free")
    # From here on nothing can fail: every pool has room.
    slots: list[np.ndarray | None] = [None] * len(co.groups)
    for g in co.token_groups:
        slots[g.layout.index] = _grow_group(co, g, rows, lengths, n, steady)
    t.length[rows] = lengths + n
    t.last_access[rows] = time.time()
    # Blocks this step fills are recorded before a window gives their parents back,
    # so the chain that reaches them is intact while it lasts.
    _continue_chains(co, rows, lengths, lengths + n, n, ids)
    for g in co.token_groups:
        if g.kind is GroupKind.sliding:
            _slide(co, g, rows, lengths)
    return slots, lengths


def _continue_chains(co: Coordinator, rows: np.ndarray, lengths: np.ndarray,
                     new_len: np.ndarray, n: int, ids: np.ndarray | None) -> None:
    """Keep the token ids and record the blocks this step filled."""
    t, bs = co.tables, co.block_size
    if ids is None:
        # Tokens without ids: the chain cannot continue past them.
        if t.hashing[rows].any():
            t.hashing[rows] = False
        return
    known = t.known[rows] == lengths
    if not known.all():  # ids after a gap are of no use to the chain
        rows, lengths, new_len, ids = rows[known], lengths[known], new_len[known], ids[known]
        if not rows.size:
            return
    t.ensure_chain_width(int(-(-new_len.max() // bs)))
    cols = lengths[:, None] + np.arange(n)
    t.token_ids[rows[:, None], cols] = ids
    t.known[rows] = new_len
    if not co.config.enable_prefix_caching:
        return
    hashing = t.hashing[rows]
    if not hashing.any():
        return
    rows, new_len = rows[hashing], new_len[hashing]
    if n == 1:
        co.record_step(rows[new_len % bs == 0])
        return
    for row, full in zip(rows.tolist(), (new_len // bs).tolist()):
        co.record_chain(row, int(t.hashed[row]), full)


def truncate_row(co: Coordinator, row: int, request_id: str, num_tokens: int) -> None:
    """Shorten ``row`` to its first ``num_tokens`` tokens.  A partly kept last block
    that another table holds, or the prefix cache serves, is copied first, so the
    tokens written next never change anyone else's data.  All or nothing."""
    t, bs = co.tables, co.block_size
    length = int(t.length[row])
    if not 0 <= num_tokens <= length:
        raise CapacityError(f"cannot truncate request {request_id!r} to {num_tokens} "
                            f"tokens: it holds {length}")
    if num_tokens == length:
        return
    keep = -(-num_tokens // bs)
    partial = bool(keep and num_tokens % bs)
    plans = []
    for g in co.token_groups:
        table = g.table
        if g.kind is GroupKind.sliding and num_tokens < int(table.released[row]) * bs \
                + g.window - 1:  # type: ignore[operator]
            raise CapacityError(f"cannot truncate request {request_id!r} to {num_tokens} "
                                f"tokens: its sliding-window layers gave back positions "
                                f"before {int(table.released[row]) * bs}, and the next token "
                                f"reads {g.window} back")
        nb = int(table.num_blocks[row])
        dropped = table.blocks[row, keep:nb].copy()
        dropped = dropped[dropped >= 0]
        last = int(table.blocks[row, keep - 1]) if partial else -1
        copy = partial and (g.pool.ref[last] > 1 or g.prefix.keyed[last])
        if copy and g.pool.num_free + _freed_by(g, dropped) < 1:
            co.counters.failures += 1
            raise OutOfBlocksError(f"truncating request {request_id!r} needs one block to "
                                   "copy its shared last block; none is free")
        plans.append((g, nb, dropped, copy))
    # From here on nothing can fail.
    for g, nb, dropped, copy in plans:
        table = g.table
        table.blocks[row, keep:nb] = -1
        table.num_blocks[row] = keep
        g.release(dropped, by=row)
        if copy:
            co.copy_on_write(row, g, np.array([keep - 1]))
        if partial:
            last = np.array([table.blocks[row, keep - 1]])
            # Its tail will be written again: not complete for any layer, not recorded.
            g.store.reset_blocks(last)
            g.prefix.forget(last)
        layers = list(g.layout.layers)
        t.written[row, layers] = np.minimum(t.written[row, layers], num_tokens)
    t.length[row] = num_tokens
    t.cached[row] = min(int(t.cached[row]), num_tokens)
    t.joined[row] = min(int(t.joined[row]), keep)
    t.known[row] = min(int(t.known[row]), num_tokens)
    t.hashed[row] = min(int(t.hashed[row]), num_tokens // bs)
    t.version[row] += 1
    co.epoch += 1


def _freed_by(g: GroupParts, blocks: np.ndarray) -> int:
    """Blocks one release of ``blocks`` would return to the free list."""
    return int(np.count_nonzero(g.pool.ref[blocks] == 1)) if blocks.size else 0
