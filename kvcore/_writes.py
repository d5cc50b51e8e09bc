"""Writing K/V into a sequence's slots and reading them back, copy-on-write safe.

**One rule for every write path** (``write``, ``write_slots``, the decode fast path):
a write goes into a block in place only if the prefix cache cannot serve that block
and no other table holds it, except for the first write of the row that fills a
block others joined while its prefill was in flight.  Otherwise ``write`` copies the
block first (copy-on-write) and ``write_slots`` refuses the mapping as stale: its
slots point into a block it may no longer change.

A :class:`~kvcore.SlotMapping` is stale when it was made by another manager, when a
sequence it covers moved its slots since (version), or when one of its blocks is no
longer writable by the rule above.  The checks are vectorised over the mapping; for
the mapping of the last decode step they run once per step, not once per layer
(:class:`FastPath`), until anything moves.

Every layer belongs to a layer group with its own blocks: a write or read of a layer
uses that group's table and pools.  Cross-attention layers hold the encoder's tokens
(written with ``write(..., start=...)``, not through a decode step's mapping);
sliding-window layers hold only the tokens their window still reads.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ._coordinator import Coordinator, GroupParts
from ._sequence_table import SequenceRecord
from ._slot_mapping import SlotMapping
from ._tensor_ref import TensorRef
from .errors import (CapacityError, OutOfBlocksError, PendingPrefixError,
                     StaleSlotMappingError, UnsupportedError, WriteOrderError)

__all__ = ["FastPath", "check_joined", "held_range", "prepare_fast_path", "read_layer",
           "settle", "write_fast", "write_mapping", "write_range"]


class FastPath:
    """The last decode step's mapping with its checks done once.  Valid while the
    coordinator's epoch is unchanged.  ``first[layer]`` says the layer is written
    exactly up to the mapping's starts (so every slot is a first write into a block
    the sequence may write in place) and has not been written through the fast path
    yet.  What a fast write changes in the books (written counts, filled blocks) is
    recorded in ``pending`` and applied by :func:`settle` before anything reads it,
    so a write costs the scatter and a few attribute checks."""

    __slots__ = ("mapping", "epoch", "first", "indices", "rows", "tokens", "pending",
                 "settled", "touched", "_row_set")

    def __init__(self, mapping: SlotMapping, epoch: int, first: list[bool],
                 indices: list[Any]) -> None:
        self.mapping = mapping
        self.epoch = epoch
        self.first = first
        #: The backend index of the slots, per layer group (``None``: cross-attention).
        self.indices = indices
        self.rows = mapping.rows
        self.tokens = mapping.num_tokens
        #: Layers written through the fast path whose books are not updated yet, and
        #: how many layers' books were updated so far.
        self.pending: list[int] = []
        self.settled = 0
        #: Whether another write touched the mapping's sequences (their written counts
        #: then say nothing about the next step).
        self.touched = False
        self._row_set: frozenset[int] | None = None

    def covers(self, row: int) -> bool:
        if self._row_set is None:
            self._row_set = frozenset(self.rows.tolist())
        return row in self._row_set

    def wrote_every_layer(self, num_layers: int) -> bool:
        """Every layer was written through the fast path and nothing else wrote these
        sequences: each is now written exactly up to the mapping's ends."""
        return self.settled == num_layers and not self.pending and not self.touched


def settle(co: Coordinator, fast: FastPath) -> None:
    """Apply the books of the fast writes so far: written counts, filled blocks."""
    layers = np.asarray(fast.pending, dtype=np.int64)
    fast.settled += layers.size
    fast.pending = []
    mapping = fast.mapping
    co.tables.written[np.ix_(mapping.rows, layers)] = mapping.ends[:, None]
    bs = co.block_size
    for g in co.token_groups:
        mine = [co.layer_local[layer] for layer in fast_layers(co, g, layers)]
        if not mine:
            continue
        slots = mapping.group_slots[g.layout.index]
        done = slots[slots % bs == bs - 1] // bs  # type: ignore[index, operator]
        if done.size:
            new = g.store.mark_filled(np.asarray(mine, dtype=np.int64), done)
            if new.size:
                g.prefix.on_complete(new)
                if co.link is not None:
                    co.link.completed(g, new)


def fast_layers(co: Coordinator, g: GroupParts, layers: np.ndarray) -> list[int]:
    index = g.layout.index
    return [int(layer) for layer in layers if co.layer_group[layer] == index]


def _complete_blocks(co: Coordinator, g: GroupParts, local: int, slots: np.ndarray) -> None:
    """Record blocks a write filled.  Writes always extend a written prefix, so
    writing a block's last slot means the whole block is there."""
    bs = co.block_size
    done = slots[slots % bs == bs - 1] // bs
    new = g.store.mark_filled(local, done)
    if new.size:
        g.prefix.on_complete(new)
        if co.link is not None:
            co.link.completed(g, new)


def write_range(co: Coordinator, row: int, request_id: str, layer: int, planes: tuple[Any, ...],
                n: int, start: int, fast: FastPath | None) -> None:
    """Write ``n`` tokens of one sequence at positions ``[start, start + n)`` of
    ``layer``; the caller validated the arrays and the range.  Blocks that may not
    be written in place are copied first."""
    t, bs = co.tables, co.block_size
    g = co.groups[co.layer_group[layer]]
    local = co.layer_local[layer]
    written = int(t.written[row, layer])
    if start > written:
        raise WriteOrderError(f"write at position {start} of layer {layer} would leave "
                              f"positions {written}..{start - 1} unwritten")
    lo, hi = start // bs, -(-(start + n) // bs)
    table = g.table
    if lo < table.released[row]:
        raise CapacityError(f"positions before {int(table.released[row]) * bs} of sliding-window "
                            f"layer {layer} were given back (outside its window of "
                            f"{g.window}); write at {start} refused")
    logical = np.arange(lo, hi)
    blocks = table.blocks[row, lo:hi]
    first = np.maximum(start, logical * bs) >= written
    ok = g.writable(np.full(blocks.size, row), blocks, first)
    if not ok.all():
        need = int(np.count_nonzero(~ok))
        if need > g.pool.num_free:
            co.counters.failures += 1
            raise OutOfBlocksError(f"copy-on-write for request {request_id!r} needs {need} "
                                   f"blocks but only {g.pool.num_free} are free")
        co.copy_on_write(row, g, logical[~ok])
    positions = np.arange(start, start + n)
    slots = table.blocks[row, positions // bs] * bs + positions % bs
    g.store.scatter(local, g.store.index(slots), planes)
    t.written[row, layer] = max(written, start + n)
    t.last_access[row] = time.time()
    _complete_blocks(co, g, local, slots)
    if fast is not None and fast.covers(row):
        fast.first[layer] = False  # this layer's written counts moved under the mapping
        fast.touched = True


def write_fast(co: Coordinator, fast: FastPath | None, mapping: Any, layer: Any, key: Any,
               value: Any) -> bool:
    """Write a layer through the decode step's fast path if it applies: the step's own
    mapping, the first write of this layer, nothing moved since the step was checked,
    arrays exactly as the cache holds them.  ``False``: take the checked path."""
    if (fast is None or mapping is not fast.mapping or fast.epoch != co.epoch
            or type(layer) is not int or not 0 <= layer < len(fast.first)
            or not fast.first[layer]):
        return False
    g = co.groups[co.layer_group[layer]]
    if not g.store.fast_kv(key, value, fast.tokens):
        return False
    g.store.scatter(co.layer_local[layer], fast.indices[g.layout.index], (key, value))
    fast.first[layer] = False
    fast.pending.append(layer)
    return True


def _stale(mapping: SlotMapping, rows_at_fault: np.ndarray, why: str) -> StaleSlotMappingError:
    ids = [mapping.request_ids[i] for i in np.flatnonzero(rows_at_fault).tolist()]
    return StaleSlotMappingError(f"the slot mapping of request(s) {ids} is stale: {why}; "
                                 "make a new one with extend/extend_batch")


def check_mapping(co: Coordinator, mapping: SlotMapping, layer: int) -> np.ndarray:
    """Every check of a mapping before writing ``layer``; returns the written counts
    of its sequences at ``layer``."""
    t = co.tables
    g = co.groups[co.layer_group[layer]]
    slots = mapping.group_slots[g.layout.index]
    if slots is None:
        raise UnsupportedError(f"layer {layer} is a cross-attention layer: it holds the "
                               "encoder's tokens, written with write(handle, layer, k, v, "
                               "start=...), not through a decode step's slot mapping")
    rows = mapping.rows
    moved = t.version[rows] != mapping.versions
    if moved.any():
        raise _stale(mapping, moved, "their blocks moved (fork, copy-on-write, swap, "
                     "truncate or deallocation) since it was made")
    written = t.written[rows, layer]
    gap = mapping.starts > written
    if gap.any():
        i = int(np.argmax(gap))
        raise WriteOrderError(f"request {mapping.request_ids[i]!r}: write at position "
                              f"{mapping.starts[i]} of layer {layer} would leave positions "
                              f"{written[i]}..{mapping.starts[i] - 1} unwritten")
    counts = mapping.ends - mapping.starts
    slot_rows = np.repeat(rows, counts)
    offsets = np.arange(slots.size) - np.repeat(np.cumsum(counts) - counts, counts)
    first = np.repeat(mapping.starts, counts) + offsets >= np.repeat(written, counts)
    blocks = slots // co.block_size
    ok = g.writable(slot_rows, blocks, first)
    if not ok.all():
        bad = np.zeros(rows.size, dtype=bool)
        bad[np.repeat(np.arange(rows.size), counts)[~ok]] = True
        raise _stale(mapping, bad, f"writing layer {layer} would change blocks that another "
                     "sequence now shares or that the prefix cache serves")
    return written


def write_mapping(co: Coordinator, mapping: SlotMapping, layer: int, planes: tuple[Any, ...],
                  fast: FastPath | None) -> None:
    """Write every token of ``mapping`` into ``layer`` after every check (arrays
    validated by the caller, fast writes settled)."""
    t = co.tables
    written = check_mapping(co, mapping, layer)
    g = co.groups[co.layer_group[layer]]
    local = co.layer_local[layer]
    slots = mapping.group_slots[g.layout.index]
    g.store.scatter(local, mapping.native(co.backend, co.config.device, g.layout.index),
                    planes)
    t.written[mapping.rows, layer] = np.maximum(written, mapping.ends)
    _complete_blocks(co, g, local, slots)  # type: ignore[arg-type]
    if fast is not None and (fast.mapping is mapping or
                             any(fast.covers(r) for r in mapping.rows.tolist())):
        fast.first[layer] = False
        fast.touched = True


def prepare_fast_path(co: Coordinator, mapping: SlotMapping, previous: FastPath | None, *,
                      checked: bool = False) -> FastPath | None:
    """The once-per-step checks of a decode step's mapping; ``None`` if no layer is
    written exactly up to the starts, or a slot is not writable in place.
    ``checked`` says the extension itself proved every slot writable (nothing was
    shared since the batch was last checked: only its own fresh or private blocks).
    ``previous`` is the last step's fast path, settled: when it covered the same
    sequences and wrote every layer, every layer is written up to the new starts."""
    t = co.tables
    rows = mapping.rows
    layers = co.config.num_layers
    if checked and previous is not None and previous.rows is rows and \
            previous.wrote_every_layer(layers - _cross_layers(co)):
        first = [co.groups[co.layer_group[layer]].token_based for layer in range(layers)]
    else:
        first_arr = (t.written[rows] == mapping.starts[:, None]).all(axis=0)
        for g in co.cross_groups:
            first_arr[list(g.layout.layers)] = False
        if not first_arr.any():
            return None
        first = first_arr.tolist()
    if not checked:
        counts = mapping.ends - mapping.starts
        slot_rows = np.repeat(rows, counts)
        ones = np.ones(slot_rows.size, dtype=bool)
        for g in co.token_groups:
            slots = mapping.group_slots[g.layout.index]
            if not g.writable(slot_rows, slots // co.block_size, ones).all():  # type: ignore[operator]
                return None
    device = co.config.device
    indices = [None if slots is None else mapping.native(co.backend, device, i)
               for i, slots in enumerate(mapping.group_slots)]
    return FastPath(mapping, co.epoch, first, indices)


def _cross_layers(co: Coordinator) -> int:
    return sum(len(g.layout.layers) for g in co.cross_groups)


def held_range(co: Coordinator, row: int, layer: int) -> tuple[int, int]:
    """Positions ``[lo, hi)`` of ``layer`` the sequence holds and has written: a
    sliding window starts past what it gave back."""
    g = co.groups[co.layer_group[layer]]
    lo = int(g.table.released[row]) * co.block_size
    return lo, int(co.tables.written[row, layer])


def _pending_error(co: Coordinator, g: GroupParts, row: int, request_id: str, layer: int,
                   unfilled: np.ndarray) -> PendingPrefixError:
    """Why ``row`` cannot read ``layer`` yet: its writer has not written it, or (an
    *orphaned* block) gave the block back before writing it, so nobody ever will."""
    if (g.writer[unfilled] >= 0).all():
        return PendingPrefixError(f"request {request_id!r} joined a prefix whose prefill has "
                                  f"not written layer {layer} yet; read it after the "
                                  "writer's write of that layer")
    first = int(np.flatnonzero(np.isin(g.table.held(row), unfilled))[0])
    start = (first + int(g.table.released[row])) * co.block_size
    end = int(co.tables.joined[row]) * co.block_size
    return PendingPrefixError(
        f"request {request_id!r} joined a prefix whose prefill was abandoned (its writer was "
        f"deallocated, truncated, swapped out or copied away) before writing layer {layer} "
        f"of positions [{start}, {end}): nobody will write them; compute them and write "
        f"them yourself (write(handle, layer, key, value, start={start}) for every layer "
        "copies the shared blocks first)")


def check_joined(co: Coordinator, g: GroupParts, row: int, request_id: str, layer: int) -> None:
    """Refuse a read of ``layer`` by ``row`` while a block it joined (a prefill in
    flight) is not written at that layer; clears the joined count once every layer is."""
    joined = co.joined_blocks(g, row)
    unfilled = joined[~g.store.filled[joined, co.layer_local[layer]]]
    if unfilled.size:
        raise _pending_error(co, g, row, request_id, layer, unfilled)
    co.joined_complete(row)


def read_layer(co: Coordinator, seq: SequenceRecord, layer: int,
               plane: int) -> TensorRef | None:
    """K (``plane=0``, or the latent vector) or V (``plane=1``) of the tokens written to
    ``layer`` and still held, in logical order, as a new array."""
    t, c = co.tables, co.config
    row, request_id = seq.row, seq.request_id
    g = co.groups[co.layer_group[layer]]
    local = co.layer_local[layer]
    if plane >= g.store.layout.planes:
        return None  # a latent layer keeps no V
    lo, n = held_range(co, row, layer)
    if n <= lo:
        return None
    if t.joined[row] and g.token_based:
        check_joined(co, g, row, request_id, layer)
    key = (int(t.version[row]), g.layout.index, lo, n)
    if seq.read_key != key:  # one index serves every layer of the group, K and V
        bs = co.block_size
        positions = np.arange(lo, n)
        slots = g.table.blocks[row, positions // bs] * bs + positions % bs
        seq.read_index = g.store.index(slots)
        seq.read_key = key
    array = g.store.gather(local, plane, seq.read_index)
    t.last_access[row] = time.time()
    heads, dim = g.store.layout.row_shapes[plane]
    return TensorRef(array, (n - lo, heads, dim), g.store.kv_dtype, c.device, co.backend)
