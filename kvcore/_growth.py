"""How sequences get and give up room: allocation (with prefix hits), extension by
a decode step or a chunk, and truncation.

Each operation is split into a *plan*, which checks everything and changes nothing,
and a *commit*, which cannot fail: a refused request leaves every part exactly as it
was.  A decode step for a whole batch is a fixed number of array operations (slots,
new blocks, copy-on-write, the prefix chain), whatever the batch size.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

from ._chain_hash import token_array
from ._coordinator import Coordinator
from .errors import CapacityError, OutOfBlocksError
from .models import AllocationRequest

__all__ = ["AllocationPlan", "commit_allocation", "extend_rows", "plan_allocation",
           "room_for", "truncate_row"]

_EMPTY = np.zeros(0, dtype=np.int64)


class AllocationPlan(NamedTuple):
    total_blocks: int
    #: Leading blocks served from the prefix cache.
    hits: np.ndarray
    #: Whether some hits are still being written (joined prefill).
    pending: bool
    #: The prompt's token ids (int32) and the keys of its full blocks, or ``None``.
    tokens: np.ndarray | None
    keys: np.ndarray | None
    salt: int

    @property
    def new_blocks(self) -> int:
        return self.total_blocks - self.hits.size


def plan_allocation(co: Coordinator, request: AllocationRequest) -> AllocationPlan:
    """What allocating ``request`` would take.  Changes nothing."""
    n = request.num_tokens or 0
    bs = co.block_size
    total = -(-n // bs)
    salt = co.salt(request.extra_key)
    if request.prompt_token_ids is None:
        return AllocationPlan(total, _EMPTY, False, None, None, salt)
    tokens = np.asarray(request.prompt_token_ids, dtype=np.int32)
    if not co.config.enable_prefix_caching:
        return AllocationPlan(total, _EMPTY, False, tokens, None, salt)
    full = n // bs
    rows = tokens[:full * bs].reshape(full, bs)
    keys = co.hasher.keys(rows, co.root_key(salt))
    # vLLM's rule: the block holding the last prompt token is computed, not served,
    # so the engine always runs at least one token and gets its logits.
    limit = full if request.allow_full_hit else max(0, (n - 1) // bs)
    hits = co.index.lookup(keys[:limit].tolist(), rows[:limit], salt,
                           pending=request.join_pending)
    pending = bool(hits.size) and not co.store.complete[hits].all()
    return AllocationPlan(total, hits, pending, tokens, keys, salt)


def room_for(co: Coordinator, plan: AllocationPlan) -> int:
    """Blocks free for ``plan`` (a free cached block it hits is taken back, not
    allocated, so it does not count as free)."""
    return co.pool.num_free - co.pool.count_free(plan.hits)


def commit_allocation(co: Coordinator, plan: AllocationPlan, row: int, n: int) -> None:
    """Give ``row`` the plan's blocks.  The caller checked there is room."""
    t, bs = co.tables, co.block_size
    hits = plan.hits
    co.pool.acquire(hits)
    blocks = np.concatenate([hits, co.take(plan.new_blocks, row)]) if hits.size \
        else co.take(plan.new_blocks, row)
    t.ensure_width(plan.total_blocks)
    t.blocks[row, :plan.total_blocks] = blocks
    t.num_blocks[row] = plan.total_blocks
    t.length[row] = n
    cached = hits.size * bs
    t.cached[row] = cached
    t.written[row] = cached
    t.joined[row] = hits.size if plan.pending else 0
    t.salt[row] = plan.salt
    t.last_access[row] = time.time()
    c = co.counters
    c.allocations += 1
    if plan.tokens is not None:
        t.token_ids[row, :n] = plan.tokens
        t.known[row] = n
    if plan.keys is not None:
        h, full = hits.size, plan.keys.size
        t.hashing[row] = True
        t.chain_key[row, :h] = plan.keys[:h]
        t.hashed[row] = h
        co.record_chain(row, h, full, plan.keys[h:])
        c.queries += full
        c.hits += h
        c.query_tokens += n
        c.hit_tokens += cached
    if hits.size:
        co.epoch += 1  # blocks other sequences write may now be shared


def _check_token_ids(token_ids: object, count: int, n: int) -> np.ndarray:
    """``token_ids`` (one sequence of ``n`` ids per sequence of the batch) as an int32
    ``[count, n]`` array; typed errors name the entry at fault."""
    if isinstance(token_ids, (str, bytes)) or not hasattr(token_ids, "__len__"):
        raise TypeError(f"token_ids must be one sequence of token ids per sequence, got "
                        f"{type(token_ids).__name__}")
    if len(token_ids) != count:  # type: ignore[arg-type]
        raise ValueError(f"token_ids has {len(token_ids)} entries for "  # type: ignore[arg-type]
                         f"{count} sequences")
    out = np.empty((count, n), dtype=np.int32)
    for i, ids in enumerate(token_ids):  # type: ignore[attr-defined]
        row = token_array(ids, f"token_ids[{i}]")
        if row.shape[0] != n:
            raise ValueError(f"token_ids[{i}] has {row.shape[0]} ids for num_tokens={n}")
        out[i] = row
    return out


def extend_rows(co: Coordinator, rows: np.ndarray, n: int, token_ids: object | None, *,
                steady: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Grow each of ``rows`` (distinct, live, resident) by ``n`` tokens.  Returns the
    slots of the new tokens (sequences in order) and their starting positions.  All
    or nothing.  ``steady`` says nothing was shared since these rows were last
    checked (same batch, same epoch), so no last block needs copy-on-write."""
    t, bs, pool = co.tables, co.block_size, co.pool
    ids = None if token_ids is None else _check_token_ids(token_ids, rows.size, n)
    lengths = t.length[rows]
    if n == 1 and steady:
        # The decode step: a row needs a new block exactly when its last one is full.
        offset = lengths % bs
        full = offset == 0
        if full.any():
            growing = rows[full]
            if growing.size > pool.num_free:
                co.counters.failures += 1
                raise OutOfBlocksError(f"extending {rows.size} sequence(s) by 1 tokens needs "
                                       f"{growing.size} blocks but only {pool.num_free} are "
                                       "free")
            column = lengths[full] // bs
            t.ensure_width(int(column.max()) + 1)
            t.blocks[growing, column] = co.take(growing.size, growing)
            t.num_blocks[growing] += 1
        slots = t.blocks[rows, lengths // bs] * bs + offset
        t.length[rows] = lengths + 1
        t.last_access[rows] = time.time()
        _continue_chains(co, rows, lengths, lengths + 1, 1, ids)
        return slots, lengths
    nb = t.num_blocks[rows]
    new_len = lengths + n
    grow = -(-new_len // bs) - nb
    # A partly used last block that another table holds is copied first.
    last = t.blocks[rows, np.maximum(nb - 1, 0)]  # only read where lengths % bs != 0
    cow = (lengths % bs != 0) & (pool.ref[last] > 1)
    need = int(grow.sum()) + int(np.count_nonzero(cow))
    if need > pool.num_free:
        co.counters.failures += 1
        raise OutOfBlocksError(f"extending {rows.size} sequence(s) by {n} tokens needs {need} "
                               f"blocks but only {pool.num_free} are free")
    # From here on nothing can fail: the pool has room for everything.
    if cow.any():
        cow_rows = rows[cow]
        src = last[cow]
        dst = co.take(cow_rows.size, cow_rows)
        co.store.copy_blocks(src, dst)
        t.blocks[cow_rows, nb[cow] - 1] = dst
        co.release(src, unique=False)
        co.counters.cow += cow_rows.size
        t.version[cow_rows] += 1
        co.epoch += 1
    if grow.any():
        growing = grow > 0
        g_rows, g_counts = rows[growing], grow[growing]
        fresh = co.take(int(g_counts.sum()), np.repeat(g_rows, g_counts))
        t.ensure_width(int((nb + grow).max()))
        first = np.repeat(nb[growing], g_counts)
        within = np.arange(fresh.size) - np.repeat(np.cumsum(g_counts) - g_counts, g_counts)
        t.blocks[np.repeat(g_rows, g_counts), first + within] = fresh
        t.num_blocks[g_rows] += g_counts
    t.length[rows] = new_len
    t.last_access[rows] = time.time()
    if n == 1:
        slots = t.blocks[rows, lengths // bs] * bs + lengths % bs
    else:
        pos = lengths[:, None] + np.arange(n)
        slots = (t.blocks[rows[:, None], pos // bs] * bs + pos % bs).reshape(-1)
    _continue_chains(co, rows, lengths, new_len, n, ids)
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
    t.ensure_width(int(-(-new_len.max() // bs)))
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
    t, bs, pool = co.tables, co.block_size, co.pool
    length = int(t.length[row])
    if not 0 <= num_tokens <= length:
        raise CapacityError(f"cannot truncate request {request_id!r} to {num_tokens} "
                            f"tokens: it holds {length}")
    if num_tokens == length:
        return
    nb = int(t.num_blocks[row])
    keep = -(-num_tokens // bs)
    dropped = t.blocks[row, keep:nb].copy()
    partial = keep and num_tokens % bs
    last = int(t.blocks[row, keep - 1]) if partial else -1
    copy = partial and (pool.ref[last] > 1 or co.index.keyed[last])
    if copy and pool.num_free + _freed_by(co, dropped) < 1:
        co.counters.failures += 1
        raise OutOfBlocksError(f"truncating request {request_id!r} needs one block to copy "
                               "its shared last block; none is free")
    # From here on nothing can fail.
    t.blocks[row, keep:nb] = -1
    t.num_blocks[row] = keep
    co.release(dropped)
    if copy:
        co.copy_on_write(row, np.array([keep - 1]))
        last = int(t.blocks[row, keep - 1])
    if partial:
        # Its tail will be written again: not complete for any layer, not recorded.
        co.store.unfill(np.array([last]))
        co.index.forget(np.array([last]))
    t.length[row] = num_tokens
    np.minimum(t.written[row], num_tokens, out=t.written[row])
    t.cached[row] = min(int(t.cached[row]), num_tokens)
    t.joined[row] = min(int(t.joined[row]), keep)
    t.known[row] = min(int(t.known[row]), num_tokens)
    t.hashed[row] = min(int(t.hashed[row]), num_tokens // bs)
    t.version[row] += 1
    co.epoch += 1


def _freed_by(co: Coordinator, blocks: np.ndarray) -> int:
    """Blocks one release of ``blocks`` would return to the free list."""
    return int(np.count_nonzero(co.pool.ref[blocks] == 1)) if blocks.size else 0

