"""The two scenarios of the differential test that take several steps: a mapping made
stale by one documented event and then reused (``op_stale_scenario``), and a request
joining a prefill in flight (``op_join_pending``); and ``reuse``, the one judgement of
a kept mapping that every reuse goes through."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from kvcore import AllocationRequest
from kvcore.errors import (OutOfBlocksError, PendingPrefixError, StaleSlotMappingError,
                           WriteOrderError)

from ._diff_model import BS, LAYERS, MapRec, RefSeq
from ._diff_steps import (SALTS, allocate, apply, deallocate, extend, fork, swap_in, swap_out,
                          truncate, write, write_fresh)

if TYPE_CHECKING:
    from ._diff_driver import Driver

__all__ = ["op_join_pending", "op_stale_scenario", "reuse"]

Touched = list[RefSeq]


def reuse(d: Driver, rec: MapRec, layer: int, *, must_refuse: bool = False) -> Touched:
    k, v = d.fresh(len(rec.mapping))
    must = must_refuse or rec.must_be_stale()
    live = [s for s in rec.seqs if s.alive]
    gap = any(start > s.written[layer] for s, start in zip(rec.seqs, rec.starts) if s.alive)
    refusals: dict[type[BaseException], int] = {StaleSlotMappingError: 0}
    if gap and not must:
        refusals[WriteOrderError] = 0
    d.note(f"  reuse mapping of {list(rec.mapping.request_ids)} layer {layer} "
           f"(stale by the rules: {must}, gap: {gap})")
    ok, _ = d.attempt(f"write_slots with a kept mapping, layer {layer}",
                      lambda: d.mgr.write_slots(layer, rec.mapping, d.native(k), d.native(v)),
                      refusals)
    if ok:
        if must or gap:
            raise d.fail(f"write_slots accepted the mapping of {list(rec.mapping.request_ids)}"
                         f" at layer {layer} although it is "
                         f"{'stale by the documented rules' if must else 'leaving a gap'}")
        apply(d, rec, layer, k, v)
        d.counts["reuse:accepted"] += 1
    else:
        d.counts["reuse:refused"] += 1
    return live


def op_stale_scenario(d: Driver) -> Touched:
    """A request with a chain nobody else has, fully written; a mapping that completes
    its last block; then one documented event; then the mapping is reused."""
    c = d.c
    event = c.pick(["fork", "cow", "share", "swap", "truncate", "deallocate"])
    d.note(f"  scenario: stale after {event}")
    tokens = [d.fresh_token()] + d.prompt()
    a = allocate(d, AllocationRequest(request_id=d.new_rid(), prompt_token_ids=tokens,
                                      extra_key=c.pick(SALTS)), fill=True)
    if a is None or min(a.written) < a.length:
        return [a] if a else []
    n = BS - a.length % BS
    rec = extend(d, [a], n, [d.continuation(a, n)], single=True)
    if rec is None:
        return [a]
    for layer in range(LAYERS):
        write_fresh(d, rec, layer)
    touched = [a]
    must = True
    if event == "fork":
        touched.append(fork(d, a))
    elif event in ("cow", "share"):
        # r shares a's whole chain through the prefix cache (a's blocks own their keys).
        req = AllocationRequest(request_id=d.new_rid(), prompt_token_ids=a.tokens + [7],
                                extra_key=a.salt, allow_full_hit=c.chance(0.5))
        r = allocate(d, req, fill=False)
        if r is None:
            return touched
        touched.append(r)
        if d.exact_hits and r.cached != a.length:
            raise d.fail(f"{r.rid} repeats the written chain of {a.rid} ({a.length} tokens) "
                         f"but was served {r.cached}")
        # Forced key collisions may cost hits; then nothing says the mapping is stale.
        tables = d.tables()
        must = int(tables[a.rid][-1]) in set(tables[r.rid].tolist())
        if event == "cow" and write(d, a, c.int(0, LAYERS - 1), a.length - 1, 1):
            if must and a.moves == rec.moves[0]:
                raise d.fail(f"overwriting {a.rid}'s block shared with {r.rid} made no copy")
    elif event == "swap":
        if not swap_out(d, a):
            return touched
        if c.chance(0.5):
            swap_in(d, a)
    elif event == "truncate":
        must = truncate(d, a, a.length - c.int(1, n))
    else:
        deallocate(d, a)
    return reuse(d, rec, c.int(0, LAYERS - 1), must_refuse=must) + touched


def op_join_pending(d: Driver) -> Touched:
    """A writer and a request admitted in the same step (join_pending): the joiner
    shares the writer's blocks before they are written, reads raise
    PendingPrefixError until the writer wrote that layer, the writer's first writes
    go in place, and the joiner reads exactly what the writer wrote."""
    c = d.c
    salt = c.pick(SALTS)
    body = [d.fresh_token()] + [t for _ in range(c.int(1, 2)) for t in c.pick(d.vocab)]
    body += [d.fresh_token() for _ in range(c.int(1, 3))]
    w = allocate(d, AllocationRequest(request_id=d.new_rid(), prompt_token_ids=body,
                                      extra_key=salt), fill=False)
    if w is None:
        return []
    shared = c.int(1, len(body) // BS)
    jtokens = body[:shared * BS] + [d.fresh_token() for _ in range(c.int(1, 3))]
    jreq = AllocationRequest(request_id=d.new_rid(), prompt_token_ids=jtokens, extra_key=salt,
                             join_pending=True)
    ok, hj = d.attempt("allocate joining a pending prefill", lambda: d.mgr.allocate(jreq),
                       {OutOfBlocksError: 1})
    if not ok:
        return [w]
    d.ref.allocations += 1
    j = RefSeq(jreq.request_id, salt, len(jtokens), list(jtokens), [hj])
    j.cached = hj.num_cached_tokens()
    j.written = [j.cached] * LAYERS
    d.ref.live[j.rid] = j
    if j.cached != shared * BS and (d.exact_hits or j.cached > shared * BS):
        raise d.fail(f"{j.rid} joined {j.cached} pending tokens of {w.rid}; expected "
                     f"{shared * BS}")
    if not j.cached:  # forced key collisions cost the hit: nothing is pending
        return [w, j]
    d.counts["join-pending"] += 1
    d.refuse("read of a joined prefix before its writer wrote it",
             lambda: hj.key_cache(0), PendingPrefixError)
    for layer in range(LAYERS):
        moves = w.moves
        if not write(d, w, layer, 0, w.length):
            raise d.fail(f"the writer {w.rid}'s first write was refused")
        if w.moves != moves:
            raise d.fail("the writer's first write into the blocks its joiner shares was copied")
        j.put(layer, 0, w.k[layer][:j.cached], w.v[layer][:j.cached])
        got = d.read_layer(j, layer)
        if got is None or not (np.array_equal(got[0], j.k[layer][:j.cached])
                               and np.array_equal(got[1], j.v[layer][:j.cached])):
            raise d.fail(f"{j.rid} layer {layer}: the joined prefix differs from what its "
                         f"writer {w.rid} wrote")
        if layer + 1 < LAYERS:
            d.refuse(f"read of joined layer {layer + 1} before its writer wrote it",
                     lambda: hj.value_cache(layer + 1), PendingPrefixError)
    return [w, j]
