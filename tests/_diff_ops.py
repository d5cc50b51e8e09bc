"""The operations of the differential test, and how often each runs (``OPS``).

Each drives the public API once, or runs one short scenario built to make a mapping
or a handle stale in a documented way and then reuse it; it returns the reference
requests it touched, which the driver checks right after it (on top of the
pool-wide check of every resident request).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvcore import AllocationRequest
from kvcore.errors import (CacheError, CapacityError, DuplicateRequestError, HandleSwappedError,
                           InvalidHandleError, OutOfBlocksError,
                           StaleSlotMappingError, UnknownRequestError, WriteOrderError)

from ._diff_model import BS, LAYERS, MapRec, RefSeq
from ._diff_scenarios import op_join_pending, op_stale_scenario, reuse
from ._diff_steps import (MAX_LEN, MAX_LIVE, SALTS, allocate, deallocate, extend, fill_up, fork,
                          pick_live, swap_in, swap_out, truncate, write, write_fresh)
from ._observe import describe_difference, observe

if TYPE_CHECKING:
    from ._diff_driver import Driver

__all__ = ["OPS"]

Touched = list[RefSeq]


def op_allocate(d: Driver) -> Touched:
    c = d.c
    if d.ref.live and c.chance(0.04):
        seq = c.pick(list(d.ref.live.values()))
        req = AllocationRequest(request_id=seq.rid, num_tokens=1)
        d.refuse(f"allocate a live id {seq.rid!r}", lambda: d.mgr.allocate(req),
                 DuplicateRequestError)
        return [seq]
    kw: dict[str, Any] = {}
    if c.chance(0.75):
        kw["prompt_token_ids"] = tokens = d.prompt()
        if c.chance(0.2):
            kw["num_tokens"] = len(tokens)
    else:
        kw["num_tokens"] = c.int(0, 10)
    req = AllocationRequest(request_id=d.new_rid(), extra_key=c.pick(SALTS),
                            allow_full_hit=c.chance(0.3), **kw)
    seq = allocate(d, req, fill=c.chance(0.85))
    return [seq] if seq else []


def op_prefill(d: Driver) -> Touched:
    """Write whatever a request has not written yet (an engine's prefill or catch-up)."""
    behind = [s for s in d.resident() if min(s.written) < s.length]
    if not behind:
        return []
    seq = d.c.pick(behind)
    fill_up(d, seq)
    return [seq]


def op_extend(d: Driver) -> Touched:
    seq = pick_live(d, resident=True, short=True)
    if seq is None:
        return []
    n = d.c.int(1, 5)
    if d.c.chance(0.08):
        # The guarded live table grows only within its blocks, through the manager.
        table = d.c.pick(seq.handles).block_table_mut()
        room = -(-seq.length // BS) * BS - seq.length
        if n > room:
            d.refuse(f"block_table_mut().extend_sequence({n}) with room for {room}",
                     lambda: table.extend_sequence(n), CapacityError)
            return [seq]
        ok, _ = d.attempt("block_table_mut().extend_sequence",
                          lambda: table.extend_sequence(n),
                          {} if d.room() else {OutOfBlocksError: 1})
        if ok:
            if d.cow_delta():
                seq.moves += 1
            seq.length += n
        return [seq]
    ids = [d.continuation(seq, n)] if d.c.chance(0.6) else None
    rec = extend(d, [seq], n, ids, single=True)
    if rec is not None and d.c.chance(0.85):
        for layer in range(LAYERS):
            if not write_fresh(d, rec, layer):
                break
    return [seq]


def op_decode_step(d: Driver) -> Touched:
    """extend_batch + write_slots for every layer (sometimes stopping early, keeping
    the mapping for a later, possibly stale, reuse).  Often the same batch, with the
    same handle objects, as the step before: a decode loop."""
    last = d.last_step
    if last is not None and d.c.chance(0.6) and all(
            s.alive and not s.swapped and s.length < MAX_LEN for s in last[0]):
        seqs, names = last
        n = 1 if d.c.chance(0.85) else 2
    else:
        cands = [s for s in d.resident() if s.length < MAX_LEN]
        if not cands:
            return []
        seqs = []
        for _ in range(d.c.int(1, min(4, len(cands)))):
            s = d.c.pick(cands)
            if s not in seqs:
                seqs.append(s)
        names = [d.handle(s) for s in seqs]
        n = 1 if d.c.chance(0.7) else d.c.int(2, 3)
    for _ in range(d.c.int(1, 3) if last is not None and names is last[1] else 1):
        if any(s.length >= MAX_LEN for s in seqs):
            break
        ids = [d.continuation(s, n) for s in seqs] if d.c.chance(0.6) else None
        rec = extend(d, seqs, n, ids, single=False, names=names)
        if rec is None:
            break
        d.last_step = (seqs, names)
        for layer in range(LAYERS):
            if not d.c.chance(0.95) or not write_fresh(d, rec, layer):
                break
    return seqs


def op_write(d: Driver) -> Touched:
    """write(): appends, overwrites of earlier positions, gaps and overruns."""
    seq = pick_live(d)
    if seq is None:
        return []
    c = d.c
    layer = c.int(0, LAYERS - 1)
    length, w = seq.length, seq.written[layer]
    mode = c.int(0, 9)
    if mode <= 3:
        start, n = None, c.int(1, max(1, min(4, length)))
    elif mode <= 7:
        start = c.int(0, w)
        n = c.int(1, max(1, min(6, length - start)))
    elif mode == 8:
        start, n = c.int(w + 1, w + 3), 1
    else:
        start = c.int(0, length)
        n = length - start + c.int(1, 2)
    first = length - n if start is None else start
    if seq.swapped:
        expect: type[BaseException] | None = HandleSwappedError
    elif first < 0 or first + n > length:
        expect = CapacityError
    elif first > w:
        expect = WriteOrderError
    else:
        expect = None
    if expect is not None:
        k, v = d.fresh(n)
        name = d.handle(seq)
        d.refuse(f"write {seq.rid} layer {layer} start={start} n={n}",
                 lambda: d.mgr.write(name, layer, d.native(k), d.native(v), start=start),
                 expect)
        return [seq]
    write(d, seq, layer, start, n)
    return [seq]


def op_reuse_mapping(d: Driver) -> Touched:
    """write_slots with a kept mapping: accepted only if no documented rule makes it
    stale; what it writes must land in the requests it covers, nowhere else."""
    if not d.ref.mappings:
        return []
    rec = d.ref.mappings[-1] if d.c.chance(0.6) else d.c.pick(d.ref.mappings)
    return reuse(d, rec, d.c.int(0, LAYERS - 1))


def op_fork(d: Driver) -> Touched:
    seq = pick_live(d)
    if seq is None:
        return []
    if seq.swapped:
        d.refuse(f"fork swapped {seq.rid}", lambda: d.mgr.fork(d.handle(seq), d.new_rid()),
                 HandleSwappedError)
        return [seq]
    if d.c.chance(0.05) and len(d.ref.live) > 1:
        other = d.c.pick([s for s in d.ref.live.values() if s is not seq] or [seq])
        d.refuse(f"fork into the live id {other.rid!r}",
                 lambda: d.mgr.fork(d.handle(seq), other.rid), DuplicateRequestError)
        return [seq]
    return [seq, fork(d, seq)]


def op_clone(d: Driver) -> Touched:
    seq = pick_live(d)
    if seq is None:
        return []
    h = d.c.pick(seq.handles)
    clone = h.clone_handle() if d.c.chance(0.7) else d.mgr.get_handle(seq.rid)
    if clone.cache_id() != h.cache_id() or clone is h:
        raise d.fail(f"a second handle of {seq.rid} is not a new reference to the same cache")
    seq.handles = (seq.handles + [clone])[-4:]
    return [seq]


def op_truncate(d: Driver) -> Touched:
    seq = pick_live(d)
    if seq is None:
        return []
    c = d.c
    if seq.swapped:
        d.refuse(f"truncate swapped {seq.rid}", lambda: d.mgr.truncate(d.handle(seq), 0),
                 HandleSwappedError)
    elif c.chance(0.1):
        bad = seq.length + c.int(1, 3) if c.chance(0.5) else -c.int(1, 3)
        d.refuse(f"truncate {seq.rid} ({seq.length} tokens) to {bad}",
                 lambda: d.mgr.truncate(d.handle(seq), bad), CapacityError)
    else:
        truncate(d, seq, max(0, seq.length - c.int(0, 6)) if c.chance(0.8)
                 else c.int(0, seq.length))
    return [seq]


def op_swap_out(d: Driver) -> Touched:
    seq = pick_live(d)
    if seq is None:
        return []
    if seq.swapped:
        d.refuse(f"swap_out swapped {seq.rid}", lambda: d.mgr.swap_out(d.handle(seq)),
                 HandleSwappedError)
    else:
        swap_out(d, seq)
    return [seq]


def op_swap_in(d: Driver) -> Touched:
    swapped = [s for s in d.ref.live.values() if s.swapped]
    if swapped:
        seq = d.c.pick(swapped)
        swap_in(d, seq)
        return [seq]
    seq = pick_live(d)
    if seq is not None:
        d.refuse(f"swap_in resident {seq.rid}", lambda: d.mgr.swap_in(d.handle(seq)),
                 CacheError)
    return [seq] if seq else []


def op_deallocate(d: Driver) -> Touched:
    seq = pick_live(d)
    if seq is not None:
        deallocate(d, seq)
    return []


def _dead_calls(d: Driver, h: Any) -> list[tuple[str, Callable[[], Any]]]:
    k, v = d.fresh(1)
    return [
        ("block_table", h.block_table), ("block_table_mut", h.block_table_mut),
        ("as_any", h.as_any), ("device", h.device), ("num_layers", h.num_layers),
        ("num_heads", h.num_heads), ("head_dim", h.head_dim),
        ("key_cache", lambda: h.key_cache(0)), ("value_cache", lambda: h.value_cache(1)),
        ("kv_cache", lambda: h.kv_cache(0)), ("clone_handle", h.clone_handle),
        ("stats", h.stats), ("num_tokens", h.num_tokens),
        ("num_cached_tokens", h.num_cached_tokens), ("num_written", lambda: h.num_written(0)),
        ("token_ids", h.token_ids), ("is_swapped", h.is_swapped),
        ("handle.write", lambda: h.write(0, d.native(k), d.native(v))),
        ("extend", lambda: d.mgr.extend(h, 1)),
        ("extend_batch", lambda: d.mgr.extend_batch([h], 1)),
        ("write", lambda: d.mgr.write(h, 0, d.native(k), d.native(v))),
        ("fork", lambda: d.mgr.fork(h, "never-" + d.new_rid())),
        ("truncate", lambda: d.mgr.truncate(h, 0)), ("swap_out", lambda: d.mgr.swap_out(h)),
        ("swap_in", lambda: d.mgr.swap_in(h)), ("deallocate", lambda: d.mgr.deallocate(h)),
        ("vllm_block_table", lambda: d.mgr.vllm_block_table([h])),
        ("flashinfer_page_table", lambda: d.mgr.flashinfer_page_table([h])),
    ]


def op_dead_handle(d: Driver) -> Touched:
    """Every method of a deallocated handle but is_valid() and cache_id() raises
    InvalidHandleError; a dead request id is unknown."""
    if not d.dead:
        return []
    h, seq, cache_id = d.c.pick(d.dead)
    name, fn = d.c.pick(_dead_calls(d, h))
    d.refuse(f"{name} on the deallocated handle of {seq.rid}", fn, InvalidHandleError)
    if h.is_valid() or h.cache_id() != cache_id:
        raise d.fail(f"a deallocated handle of {seq.rid} reports is_valid()={h.is_valid()}, "
                     f"cache_id()={h.cache_id()!r}")
    if seq.rid not in d.ref.live:
        rid = seq.rid
        name, fn = d.c.pick([
            ("deallocate", lambda: d.mgr.deallocate(rid)), ("extend", lambda: d.mgr.extend(rid, 1)),
            ("get_handle", lambda: d.mgr.get_handle(rid)),
            ("fork", lambda: d.mgr.fork(rid, "never-" + rid)),
            ("truncate", lambda: d.mgr.truncate(rid, 0)),
            ("swap_out", lambda: d.mgr.swap_out(rid))])
        d.refuse(f"{name} of the dead request id {rid!r}", fn, UnknownRequestError)
    return []


def op_foreign(d: Driver) -> Touched:
    """Handles and mappings of another manager (same config, same backend) are refused,
    and this manager's mappings are refused by the other."""
    other = d.other
    if not d.other_handles or d.c.chance(0.2):
        if len(other) >= 3:
            other.deallocate(d.other_handles.pop(0))
        d.other_handles.append(other.allocate(AllocationRequest(
            request_id=f"o{d.op_index}", num_tokens=0)))
    oh = d.c.pick(d.other_handles)
    what = d.c.int(0, 2)
    if what == 0:
        m = other.extend(oh, 1)
        k, v = d.fresh(1)
        rec = MapRec(m, [], [], [], [], foreign=True)
        d.ref.remember(rec)
        reuse(d, rec, d.c.int(0, LAYERS - 1))
        for layer in range(LAYERS):  # the other manager's own use of it is fine
            other.write_slots(layer, m, d.native(k), d.native(v))
    elif what == 1:
        k, v = d.fresh(1)
        name, fn = d.c.pick([
            ("write", lambda: d.mgr.write(oh, 0, d.native(k), d.native(v))),
            ("extend", lambda: d.mgr.extend(oh, 1)), ("fork", lambda: d.mgr.fork(oh, "x")),
            ("truncate", lambda: d.mgr.truncate(oh, 0)),
            ("deallocate", lambda: d.mgr.deallocate(oh)),
            ("extend_batch", lambda: d.mgr.extend_batch([oh], 1))])
        d.refuse(f"{name} with another manager's handle", fn, InvalidHandleError)
    elif d.ref.mappings:
        rec = d.c.pick(d.ref.mappings)
        if not rec.foreign:
            k, v = d.fresh(len(rec.mapping))
            before = observe(other, kv=False)
            try:
                other.write_slots(0, rec.mapping, d.native(k), d.native(v))
            except StaleSlotMappingError:
                pass
            else:
                raise d.fail("another manager accepted this manager's mapping")
            diff = describe_difference(before, observe(other, kv=False))
            if diff:
                raise d.fail(f"another manager refused this manager's mapping but changed: "
                             f"{diff}")
    other.check_invariants()
    return []


def op_gc(d: Driver) -> Touched:
    d.changed()
    before = d.mgr.stats()
    gc = d.mgr.gc()
    after = d.mgr.stats()
    if (gc.blocks_freed, after.cached_blocks, after.free_blocks) != (
            before.cached_blocks, 0, before.free_blocks + before.cached_blocks):
        raise d.fail(f"gc freed {gc.blocks_freed} blocks; stats {before} -> {after}")
    return []


def op_reset_prefix_cache(d: Driver) -> Touched:
    d.changed()
    d.mgr.reset_prefix_cache()
    d.ref.allowed.clear()  # nothing recorded so far may be served again
    if d.mgr.stats().cached_blocks:
        raise d.fail("reset_prefix_cache left cached free blocks")
    return []


def op_verify_all(d: Driver) -> Touched:
    return list(d.ref.live.values())


#: name -> (operation, weight or weight(number of live requests)).
OPS: dict[str, tuple[Callable[[Driver], Touched], Any]] = {
    "verify_all": (op_verify_all, 1),
    "allocate": (op_allocate, lambda live: 16 if live < MAX_LIVE else 3),
    "extend": (op_extend, 7),
    "prefill": (op_prefill, 5),
    "decode_step": (op_decode_step, 14),
    "write": (op_write, 14),
    "reuse_mapping": (op_reuse_mapping, 8),
    "stale_scenario": (op_stale_scenario, 3),
    "join_pending": (op_join_pending, 2),
    "fork": (op_fork, 5),
    "clone": (op_clone, 2),
    "truncate": (op_truncate, 6),
    "swap_out": (op_swap_out, 3),
    "swap_in": (op_swap_in, 4),
    "deallocate": (op_deallocate, lambda live: 2 + 4 * max(0, live - 5)),
    "dead_handle": (op_dead_handle, 4),
    "foreign": (op_foreign, 2),
    "gc": (op_gc, 1),
    "reset_prefix_cache": (op_reset_prefix_cache, 0.3),
}
