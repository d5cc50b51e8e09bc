"""Batch reads: one layer's K and V for a whole batch, padded, in one gather each.

Attention over a batch wants ``[batch, tokens, kv_heads, dim]`` (``"NHD"``, what
FlashAttention and vLLM's kernels take) or ``[batch, kv_heads, tokens, dim]``
(``"HND"``, what transformers' attention takes).  Reading sequence by sequence and
stacking costs one gather and one copy per sequence; here the batch's block ids are
laid out as a ``[batch, max_blocks]`` rectangle on the host and the backend gathers
whole blocks in one call per plane, so the bytes move once, block-sized rows at a
time (:meth:`Backend.gather_blocks`).

Row ``b`` holds the positions ``[starts[b], starts[b] + lengths[b])`` of sequence ``b``
at columns ``[0, lengths[b])`` (``starts`` is 0 unless a sliding window gave its
oldest blocks back); columns past ``lengths[b]`` are zero, so a masked attention
never meets another sequence's numbers or a NaN left in a reused block.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ._coordinator import Coordinator
from ._sequence_table import SequenceRecord
from ._tensor_ref import TensorRef
from ._writes import check_joined

__all__ = ["BatchKv", "read_batch"]

BatchLayout = Literal["NHD", "HND"]
_LAYOUTS = ("NHD", "HND")


@dataclass(frozen=True, eq=False)
class BatchKv:
    """One layer's K and V for a batch (see :meth:`KvCacheManager.read_batch`).

    ``key``/``value``: ``[batch, tokens, kv_heads, dim]`` (``layout="NHD"``) or
    ``[batch, kv_heads, tokens, dim]`` (``"HND"``), new arrays of the backend's
    library, zero past each row's length; ``value`` is ``None`` for a latent layer.
    ``lengths[b]``: the tokens row ``b`` holds; ``starts[b]``: the position of its
    column 0 (non-zero only where a sliding window gave blocks back).  ``int64``."""

    key: TensorRef
    value: TensorRef | None
    lengths: np.ndarray
    starts: np.ndarray
    layout: BatchLayout


def check_layout(layout: object) -> BatchLayout:
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {list(_LAYOUTS)} ([batch, tokens, heads, "
                         f"dim] or [batch, heads, tokens, dim]), got {layout!r}")
    return layout  # type: ignore[return-value]


def read_batch(co: Coordinator, seqs: list[SequenceRecord], layer: int,
               layout: BatchLayout) -> BatchKv:
    """The batch read (see the module docstring); ``seqs`` are live and resident."""
    t, bs, c = co.tables, co.block_size, co.config
    g = co.groups[co.layer_group[layer]]
    local = co.layer_local[layer]
    rows = np.fromiter((s.row for s in seqs), dtype=np.int64, count=len(seqs))
    if g.token_based:
        for i in np.flatnonzero(t.joined[rows]).tolist():  # rare: a prefill joined
            check_joined(co, g, int(rows[i]), seqs[i].request_id, layer)
    first = g.table.released[rows]
    starts = first * bs
    lengths = np.maximum(t.written[rows, layer] - starts, 0)
    tokens = int(lengths.max()) if rows.size else 0
    width = -(-tokens // bs)
    # The [batch, width] rectangle of block ids; cells past a row's blocks read block
    # 0 (any valid id) and are zeroed below.
    table = g.table.blocks
    cols = np.minimum(first[:, None] + np.arange(width, dtype=np.int64),
                      max(table.shape[1] - 1, 0))
    used = np.arange(width) < (-(-lengths // bs))[:, None]
    blocks = np.where(used, table[rows[:, None], cols], 0)
    index = g.store.block_index(blocks)
    pad = np.arange(tokens) >= lengths[:, None]
    ops = co.backend.array_ops()
    t.last_access[rows] = time.time()
    out: list[TensorRef | None] = []
    for plane in range(2):
        if plane >= g.store.layout.planes:
            out.append(None)  # a latent layer keeps no V
            continue
        heads, dim = g.store.layout.row_shapes[plane]
        array = g.store.gather_blocks(local, plane, index)
        array = array.reshape(rows.size, width * bs, heads, dim)
        if width * bs != tokens:
            array = array[:, :tokens]
        if pad.any():
            array = ops.zero_rows(array, pad)
        shape = (rows.size, tokens, heads, dim)
        if layout == "HND":
            array = ops.permute(array, (0, 2, 1, 3))
            shape = (rows.size, heads, tokens, dim)
        out.append(TensorRef(array, shape, c.dtype, c.device, co.backend))
    return BatchKv(out[0], out[1], lengths, starts, layout)  # type: ignore[arg-type]
