"""The steps the differential test's operations are made of: each drives the public
API once, predicts the outcome from the reference, and updates it.

Outcomes the reference can
predict exactly are asserted exactly (which refusal, how many copy-on-write copies an
extend makes, when a swap or an extend runs out of blocks); where the manager may
legitimately choose (whether a prefix is served, whether a reused mapping that is
not stale by the documented rules is refused) the consequences are checked instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from kvcore import AllocationRequest
from kvcore.errors import OutOfBlocksError, WriteOrderError

from ._diff_model import BS, LAYERS, MapRec, RefSeq

if TYPE_CHECKING:
    from ._diff_driver import Driver

__all__ = ["MAX_LEN", "MAX_LIVE", "SALTS", "allocate", "apply", "deallocate", "extend",
           "fill_up", "fork", "pick_live", "swap_in", "swap_out", "truncate", "write",
           "write_fresh"]

MAX_LEN = 36
MAX_LIVE = 10
SALTS = [None, None, None, None, None, "", "tenant-a", "tenant-b"]


# --- shared steps ---------------------------------------------------------------------------


def allocate(d: Driver, req: AllocationRequest, *, fill: bool) -> RefSeq | None:
    """Allocate ``req``; check and adopt whatever the prefix cache served."""
    n = req.num_tokens or 0
    d.note(f"  allocate {req.request_id!r} n={n} ids={req.prompt_token_ids} "
           f"salt={req.extra_key!r} full_hit={req.allow_full_hit}")
    # Prefix hits only lower the need: with room for every block it cannot fail.
    may_fail = -(-n // BS) > d.room()
    ok, h = d.attempt(f"allocate {req.request_id!r}", lambda: d.mgr.allocate(req),
                      {OutOfBlocksError: 1} if may_fail else {})
    if not ok:
        return None
    d.ref.allocations += 1
    seq = RefSeq(req.request_id, req.extra_key, n, list(req.prompt_token_ids or ()), [h])
    bind_hits(d, seq, h, req)
    d.ref.live[seq.rid] = seq
    if fill:
        fill_up(d, seq)
    return seq


def bind_hits(d: Driver, seq: RefSeq, h: Any, req: AllocationRequest) -> None:
    """The served prefix: whole blocks, within the rules, complete for every layer,
    and for each block and layer a content an identical chain wrote."""
    cached = h.num_cached_tokens()
    n = seq.length
    if req.prompt_token_ids is None:
        limit = 0
    else:
        limit = n // BS if req.allow_full_hit else max(0, (n - 1) // BS)
    if cached % BS or cached > limit * BS:
        raise d.fail(f"{seq.rid} was served {cached} cached tokens; at most {limit} whole "
                     f"blocks of {BS} may be served (allow_full_hit={req.allow_full_hit})")
    written = tuple(h.num_written(layer) for layer in range(LAYERS))
    if written != (cached,) * LAYERS:
        raise d.fail(f"{seq.rid}: {cached} tokens served but num_written is {written}")
    seq.cached = cached
    seq.written = [cached] * LAYERS
    if not cached:
        return
    d.counts["prefix-hit"] += 1
    d.counts["prefix-hit-blocks"] += cached // BS
    for layer in range(LAYERS):
        got = d.read_layer(seq, layer)
        if got is None:
            raise d.fail(f"{seq.rid} layer {layer}: served prefix reads as None")
        k, v = got
        for block in range(cached // BS):
            if not d.ref.hit_is_allowed(seq, layer, block, k, v):
                raise d.fail(f"{seq.rid} layer {layer} block {block}: served K/V that no "
                             f"request with the identical prefix (salt {seq.salt!r}, ids "
                             f"{seq.tokens[:(block + 1) * BS]}) held fully written")
        seq.put(layer, 0, k, v)


def write(d: Driver, seq: RefSeq, layer: int, start: int | None, n: int) -> bool:
    """A write the reference allows; it can only run out of blocks for copy-on-write
    copies, hence not when every block it touches could be copied."""
    k, v = d.fresh(n)
    first = seq.length - n if start is None else start
    touched = -(-(first + n) // BS) - first // BS
    refusals = {OutOfBlocksError: 1} if touched > d.room() else {}
    name = d.handle(seq)
    if not isinstance(name, str) and d.c.chance(0.3):
        fn = lambda: name.write(layer, d.native(k), d.native(v), start=start)  # noqa: E731
    else:
        fn = lambda: d.mgr.write(name, layer, d.native(k), d.native(v), start=start)  # noqa: E731
    ok, _ = d.attempt(f"write {seq.rid} layer {layer} start={start} n={n}", fn, refusals)
    if ok:
        if d.cow_delta():
            seq.moves += 1  # its copied blocks moved its slots
        seq.put(layer, first, k, v)
        d.ref.feed(seq, layer, first, first + n)
    return ok


def fill_up(d: Driver, seq: RefSeq) -> bool:
    """Write every position not yet written, layer by layer (an engine's prefill)."""
    for layer in range(LAYERS):
        start = seq.written[layer]
        if start < seq.length and not write(d, seq, layer, start, seq.length - start):
            return False
    return True


def extend(d: Driver, seqs: list[RefSeq], n: int, ids: list[list[int]] | None, *,
           single: bool, names: list[Any] | None = None) -> MapRec | None:
    """Extend ``seqs`` by ``n`` tokens.  Copy-on-write and running out of blocks are
    predicted exactly: a partly used last block held by another table is copied."""
    tables = d.tables()
    cow = [s for s in seqs if s.length % BS and int(tables[s.rid][-1]) in d.sharers(s, tables)]
    grow = sum(-(-(s.length + n) // BS) + (s.length // -BS) for s in seqs)
    names = names if names is not None else [d.handle(s) for s in seqs]
    if single and d.c.chance(0.5):
        one = None if ids is None else ids[0]
        fn = lambda: d.mgr.extend(names[0], n, token_ids=one)  # noqa: E731
    else:
        fn = lambda: d.mgr.extend_batch(names, n, token_ids=ids)  # noqa: E731
    room = d.room()
    d.note(f"  extend {[s.rid for s in seqs]} by {n} ids={ids} (need {grow}+{len(cow)}, "
           f"room {room})")
    if grow + len(cow) > room:
        d.refuse(f"extend needing {grow} new blocks and {len(cow)} copies with {room} free",
                 fn, OutOfBlocksError, failures=1)
        return None
    _, m = d.attempt("extend", fn, {})
    copies = d.cow_delta()
    if copies != len(cow):
        raise d.fail(f"extend made {copies} copy-on-write copies; the shared partly used "
                     f"last blocks were those of {[s.rid for s in cow]}")
    for s in cow:
        s.moves += 1
    starts = []
    for i, s in enumerate(seqs):
        starts.append(s.length)
        if ids is not None and len(s.tokens) == s.length:
            s.tokens += list(ids[i])
        s.length += n
    check_slots(d, m, seqs, starts, n)
    rec = MapRec(m, list(seqs), starts, [a + n for a in starts], [s.moves for s in seqs])
    d.ref.remember(rec)
    return rec


def check_slots(d: Driver, m: Any, seqs: list[RefSeq], starts: list[int], n: int) -> None:
    """The mapping's slots are where the public block tables put the new positions."""
    if len(m) != n * len(seqs) or tuple(m.request_ids) != tuple(s.rid for s in seqs):
        raise d.fail(f"mapping of {len(m)} slots for {m.request_ids}; expected "
                     f"{n} per request of {[s.rid for s in seqs]}")
    slots = np.asarray(m.slots)
    tables = d.tables()
    for i, (s, start) in enumerate(zip(seqs, starts)):
        blocks = tables[s.rid]
        pos = np.arange(start, start + n)
        if not np.array_equal(slots[i * n:(i + 1) * n], blocks[pos // BS] * BS + pos % BS):
            raise d.fail(f"{s.rid}: mapping slots {slots[i * n:(i + 1) * n].tolist()} are "
                         f"not positions {start}..{start + n - 1} of its block table")


def apply(d: Driver, rec: MapRec, layer: int, k: np.ndarray, v: np.ndarray) -> None:
    off = 0
    for s, start, end in zip(rec.seqs, rec.starts, rec.ends):
        s.put(layer, start, k[off:off + end - start], v[off:off + end - start])
        d.ref.feed(s, layer, start, end)
        off += end - start


def write_fresh(d: Driver, rec: MapRec, layer: int) -> bool:
    """Write a mapping just made: accepted, unless a request has unwritten positions
    before it at this layer (documented: WriteOrderError)."""
    k, v = d.fresh(len(rec.mapping))
    fn = lambda: d.mgr.write_slots(layer, rec.mapping, d.native(k), d.native(v))  # noqa: E731
    if any(start > s.written[layer] for s, start in zip(rec.seqs, rec.starts)):
        d.refuse(f"write_slots leaving a gap at layer {layer}", fn, WriteOrderError)
        return False
    d.attempt(f"write_slots of a fresh mapping, layer {layer}", fn, {})
    apply(d, rec, layer, k, v)
    return True


def fork(d: Driver, seq: RefSeq) -> RefSeq:
    rid = d.new_rid()
    name = d.handle(seq)
    _, h = d.attempt(f"fork {seq.rid} -> {rid}", lambda: d.mgr.fork(name, rid), {})
    d.ref.allocations += 1
    child = seq.copy_as(rid, [h])
    seq.moves += 1
    d.ref.live[rid] = child
    return child


def truncate(d: Driver, seq: RefSeq, n: int) -> bool:
    name = d.handle(seq)
    # It may need one block to copy a shared last block; there is one if any is free.
    ok, _ = d.attempt(f"truncate {seq.rid} to {n}", lambda: d.mgr.truncate(name, n),
                      {} if d.room() else {OutOfBlocksError: 1})
    if not ok:
        return False
    d.cow_delta()
    if n != seq.length:
        seq.moves += 1
    seq.length = n
    seq.written = [min(w, n) for w in seq.written]
    del seq.tokens[n:]
    seq.cached = min(seq.cached, n)
    return True


def swap_out(d: Driver, seq: RefSeq) -> bool:
    need = -(-seq.length // BS)
    free = d.mgr.stats().swap_free_blocks
    fn = lambda: d.mgr.swap_out(d.handle(seq))  # noqa: E731
    if need > free:
        d.refuse(f"swap_out of {need} blocks with {free} swap blocks free", fn,
                 OutOfBlocksError, failures=1)
        return False
    d.attempt(f"swap_out {seq.rid}", fn, {})
    seq.swapped = True
    seq.moves += 1
    return True


def swap_in(d: Driver, seq: RefSeq) -> bool:
    need = -(-seq.length // BS)
    room = d.room()
    fn = lambda: d.mgr.swap_in(d.handle(seq))  # noqa: E731
    if need > room:
        d.refuse(f"swap_in of {need} blocks with {room} free", fn, OutOfBlocksError,
                 failures=1)
        return False
    d.attempt(f"swap_in {seq.rid}", fn, {})
    seq.swapped = False
    seq.moves += 1
    return True


def deallocate(d: Driver, seq: RefSeq) -> None:
    name = d.handle(seq)
    d.attempt(f"deallocate {seq.rid}", lambda: d.mgr.deallocate(name), {})
    seq.alive = False
    seq.moves += 1
    del d.ref.live[seq.rid]
    for h in seq.handles:
        d.dead.append((h, seq, h.cache_id()))
    del d.dead[:-30]


def pick_live(d: Driver, *, resident: bool = False, short: bool = False) -> RefSeq | None:
    seqs = d.resident() if resident else list(d.ref.live.values())
    if short:
        seqs = [s for s in seqs if s.length < MAX_LEN]
    return d.c.pick(seqs) if seqs else None

