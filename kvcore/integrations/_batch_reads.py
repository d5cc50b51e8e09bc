"""Reading a batch's K/V out of a kvcore pool as the rectangle transformers attends over.

transformers lays a batch out as a ``[batch, heads, columns, head_dim]`` rectangle:
left padding first, each row's tokens ending at the last column.  A full-attention
layer attends over every column; a sliding-window layer over its last
``min(past, window - 1) + new`` columns (the ``kv_length`` its ``get_mask_sizes``
reports, starting at ``kv_offset``).  kvcore rows hold only real tokens (and a sliding
group only the blocks its window still reads), so a rectangle is one index of pool
slots per layer group, made once per forward pass, and each layer reads K and V with
one ``index_select`` through it.

A column a row holds no token for (padding, or a position before what a sliding
window still holds) is never attended: the mask hides it.  Its slot is the row's
first held token, so the gather reads a value the model wrote (finite: a hidden
column weighs exactly zero in the softmax) and no ``where`` pass is needed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .._device import DType

__all__ = ["PoolViews", "advance", "hide", "rectangle_slots"]


def rectangle_slots(blocks: np.ndarray, lengths: np.ndarray, pads: np.ndarray, width: int,
                    first_column: int, block_size: int) -> np.ndarray:
    """``[batch, width - first_column]`` pool slots of the rectangle's columns
    ``first_column .. width - 1``.

    ``blocks`` is the group's ``[batch, max_blocks]`` block table with ``-1`` where a
    row holds no block (a window gave it back, or past the row's end), ``lengths``
    the rows' token counts, ``pads`` their left padding (column ``c`` of row ``r`` is
    position ``c - pads[r]``).  Columns without a held token get the row's first held
    slot."""
    bs = block_size
    held = blocks >= 0
    lo = np.argmax(held, axis=1).astype(np.int64) * bs  # the first held position
    pos = np.arange(first_column, width, dtype=np.int64)[None, :] - pads[:, None]
    pos = np.where((pos >= lo[:, None]) & (pos < lengths[:, None]), pos, lo[:, None])
    page = np.take_along_axis(blocks, pos // bs, axis=1).astype(np.int64)
    return page * bs + pos % bs


def advance(slots: np.ndarray, new: np.ndarray, positions: np.ndarray, keep: int,
            block_size: int) -> np.ndarray:
    """The rectangle's slots one decode token later, from the last step's: its last
    ``keep`` columns, then the new token's column (``new``, at each row's
    ``positions``).  The tokens before the new one in its block are set from the new
    slot too: an extension that copied a shared last block (copy-on-write) moved them
    there, and every other block stays where it was.  Columns no row holds keep stale
    slots; :func:`hide` points them somewhere safe."""
    rows = slots.shape[0]
    out = np.empty((rows, keep + 1), dtype=np.int64)
    out[:, :keep] = slots[:, slots.shape[1] - keep:]
    out[:, keep] = new
    k = min(block_size, keep + 1)
    back = np.arange(k)
    same_block = back[None, :] <= (positions % block_size)[:, None]
    tail = out[:, keep + 1 - k:][:, ::-1]  # a view: column -1 - j is tail[:, j]
    np.copyto(tail, new[:, None] - back[None, :], where=same_block)
    return out


def hide(slots: np.ndarray, first_column: int, pads: np.ndarray, new: np.ndarray) -> np.ndarray:
    """``slots`` with every padding column pointed at the row's newest token (written
    for the layer before it is read)."""
    if not pads.size or int(pads.max()) <= first_column:
        return slots
    columns = np.arange(first_column, first_column + slots.shape[1])
    return np.where(columns[None, :] >= pads[:, None], slots, new[:, None])


class PoolViews:
    """torch views of a manager's layer pools, flattened to ``[planes, slots, heads,
    dim]``: one per pool (K and V share one; a layer whose K and V widths differ has
    two; a quantized cache adds its scales pool last, one plane per K/V plane, and
    reads decode codes times scales into the cache's ``compute_dtype``).  Kept per
    layer when the backend changes pools in place; asked for again on every read when
    it does not (an immutable backend hands out a new pool after each write)."""

    __slots__ = ("_manager", "_views", "_keep", "_codec", "_compute")

    def __init__(self, manager: Any) -> None:
        self._manager = manager
        self._views: dict[int, tuple[torch.Tensor, ...]] = {}
        self._keep = bool(getattr(manager.backend, "mutable_pools", True))
        config = manager.config
        self._codec: DType | None = config.dtype if config.dtype.is_codec else None
        self._compute = getattr(torch, config.compute_dtype.value)

    def __call__(self, layer: int) -> tuple[torch.Tensor, ...]:
        views = self._views.get(layer)
        if views is None:
            views = tuple(_as_torch(ref.native).flatten(1, 2)
                          for ref in self._manager.layer_pools(layer))
            if self._keep:
                self._views[layer] = views
        return views

    def gather(self, layer: int, index: torch.Tensor, batch: int,
               width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``layer`` at the slots of ``index`` (``batch * width`` of them),
        as ``[batch, heads, width, dim]`` views."""
        views = self(layer)
        if self._codec is not None:
            return self._gather_decoded(views, index, batch, width)
        if len(views) == 1:
            kv = views[0].index_select(1, index)
            kv = kv.view(2, batch, width, kv.shape[-2], kv.shape[-1])
            return kv[0].transpose(1, 2), kv[1].transpose(1, 2)
        out = []
        for view in views:  # K and V of different widths: one pool each
            x = view[0].index_select(0, index)
            out.append(x.view(batch, width, x.shape[-2], x.shape[-1]).transpose(1, 2))
        return out[0], out[1]

    def _gather_decoded(self, views: tuple[torch.Tensor, ...], index: torch.Tensor,
                        batch: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of a quantized layer: codes and scales through one index, decoded
        as kvcore's codecs decode them (float32 value times float32 scale, then
        the compute dtype), so these reads equal ``handle.key_cache(layer)``."""
        codes, scales = views[:-1], views[-1].index_select(1, index)
        if len(codes) == 1:
            c = codes[0].index_select(1, index)
            planes = [c[0], c[1]]
        else:
            planes = [view[0].index_select(0, index) for view in codes]
        out = []
        for plane, scale in zip(planes, scales):
            x = _code_values(plane, self._codec) * scale
            x = x.to(self._compute)
            out.append(x.view(batch, width, x.shape[-2], x.shape[-1]).transpose(1, 2))
        return out[0], out[1]


#: torch's float8 dtypes of kvcore's float8 codecs (codes are stored as their bits).
_FLOAT8 = {DType.float8_e4m3: "float8_e4m3fn", DType.float8_e5m2: "float8_e5m2"}


def _code_values(codes: torch.Tensor, codec: DType) -> torch.Tensor:
    """The float32 values of int8 codes or of float8 bit patterns."""
    if codec is DType.int8:
        return codes.float()
    return codes.view(getattr(torch, _FLOAT8[codec])).float()


def _as_torch(array: Any) -> torch.Tensor:
    return array if isinstance(array, torch.Tensor) else torch.from_dlpack(array)
