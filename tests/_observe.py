"""Everything a caller can observe about a manager, captured through the public API,
to prove that a refused call changed nothing.

K/V are compared as raw bits (``uint32``/``uint16`` views), never as floats: a NaN
payload, a signalling NaN, ``-0.0`` or a subnormal must come back exactly as written,
and ``NaN != NaN`` must not hide a difference.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvcore import KvCacheManager
from kvcore.errors import PendingPrefixError

__all__ = ["bits", "describe_difference", "observe"]

_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def bits(array: Any) -> np.ndarray:
    """A host copy of ``array`` (a TensorRef or anything speaking DLPack, or a numpy
    array) viewed as unsigned integers of the same width: bit patterns to compare."""
    host = array if isinstance(array, np.ndarray) else np.from_dlpack(array)
    host = np.ascontiguousarray(host).copy()
    return host.view(_UINT[host.dtype.itemsize])


def observe(mgr: KvCacheManager, *, kv: bool = True) -> dict[str, Any]:
    """The manager's observable state: statistics, pressure, every live sequence's table,
    lengths, written counts, token ids and swap state, every layer's pool as bits,
    and (``kv=True``) every resident sequence's K and V per layer as bits and its
    handle statistics.

    ``last_access`` timestamps are left out: reads legitimately move them.  With
    ``kv=False`` (the differential test takes this snapshot around every refusable
    call) the tables of resident sequences come from one ``vllm_block_table`` call and
    what the table already says (``num_tokens``, handle statistics) is not asked
    again."""
    layers = mgr.config.num_layers
    state: dict[str, Any] = {
        "stats": mgr.stats().model_dump(),
        "pressure": mgr.pressure(),
        "len": len(mgr),
        "pools": tuple(bits(mgr.layer_pool(layer)).tobytes() for layer in range(layers)),
    }
    handles = mgr.list_handles()
    swapped = [h.is_swapped() for h in handles]
    resident = [h for h, s in zip(handles, swapped) if not s]
    batch = mgr.vllm_block_table(resident, pad_value=-1)
    tables = {h.request_id: (tuple(row[row >= 0].tolist()), int(n))
              for h, row, n in zip(resident, batch.block_tables, batch.seq_lens)}
    live = {}
    for h, is_swapped in zip(handles, swapped):
        if is_swapped:
            table = h.block_table()
            blocks, length = table.physical_blocks, table.sequence_length
        else:
            blocks, length = tables[h.request_id]
        entry: dict[str, Any] = {
            "cache_id": h.cache_id(),
            "blocks": blocks,
            "length": length,
            "cached": h.num_cached_tokens(),
            "written": tuple(h.num_written(layer) for layer in range(layers)),
            "token_ids": h.token_ids(),
            "swapped": is_swapped,
        }
        if kv:
            entry["num_tokens"] = h.num_tokens()
            entry["stats"] = h.stats().model_dump(exclude={"last_access"})
        if kv and not is_swapped:
            data = []
            for layer in range(layers):
                try:
                    pair = h.kv_cache(layer)
                except PendingPrefixError:
                    data.append("pending")
                    continue
                data.append(None if pair is None else
                            (bits(pair[0]).tobytes(), bits(pair[1]).tobytes()))
            entry["kv"] = tuple(data)
        live[h.request_id] = entry
    state["live"] = live
    return state


def describe_difference(before: dict[str, Any], after: dict[str, Any], *,
                        failures_added: int = 0) -> str | None:
    """``None`` when ``after`` is ``before`` except that ``allocation_failures`` grew by
    exactly ``failures_added``; otherwise what differs, in words."""
    want = before["stats"]["allocation_failures"] + failures_added
    got = after["stats"]["allocation_failures"]
    if got != want:
        return f"allocation_failures is {got}, expected {want}"
    problems = []
    for key in ("pressure", "len"):
        if before[key] != after[key]:
            problems.append(f"{key}: {before[key]!r} -> {after[key]!r}")
    sb = {k: v for k, v in before["stats"].items() if k != "allocation_failures"}
    sa = {k: v for k, v in after["stats"].items() if k != "allocation_failures"}
    for key in sorted(sb.keys() | sa.keys()):
        if sb.get(key) != sa.get(key):
            problems.append(f"stats.{key}: {sb.get(key)!r} -> {sa.get(key)!r}")
    for layer, (pb, pa) in enumerate(zip(before["pools"], after["pools"])):
        if pb != pa:
            problems.append(f"the pool of layer {layer} changed")
    lb, la = before["live"], after["live"]
    if lb.keys() != la.keys():
        problems.append(f"live requests {sorted(lb)} -> {sorted(la)}")
    for rid in sorted(lb.keys() & la.keys()):
        for key in lb[rid].keys() | la[rid].keys():
            if lb[rid].get(key) != la[rid].get(key):
                what = "K/V bits" if key == "kv" else \
                    f"{lb[rid].get(key)!r} -> {la[rid].get(key)!r}"
                problems.append(f"request {rid!r} {key}: {what}")
    return "; ".join(problems) if problems else None
