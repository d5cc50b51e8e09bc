"""Moving K/V in and out of the pool: validated writes (one sequence, or a batch
through a SlotMapping), copy-on-write before a write, and reads in logical order."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from ._block_table import _slots_of
from ._manager_state import ManagerState
from ._sequence import _Sequence
from ._slot_mapping import SlotMapping
from ._tensor_ref import TensorRef
from .errors import (CapacityError, DeviceMismatchError, DtypeMismatchError,
                     OutOfBlocksError, ShapeMismatchError, StaleSlotMappingError,
                     WriteOrderError)

if TYPE_CHECKING:
    from ._paged_handle import PagedKvCacheHandle

__all__ = ["KvIOMixin"]


class KvIOMixin(ManagerState):
    """``write``, ``write_slots`` and the handles' reads of :class:`~kvcore.KvCacheManager`."""

    def _mark_filled(self, layer: int, slots: np.ndarray) -> None:
        """Record blocks that a write to ``layer`` completed.  Writes always extend a
        written prefix, so writing a block's last slot means the whole block is there."""
        bs = self._config.block_size
        self._mark_blocks_filled(layer, slots[slots % bs == bs - 1] // bs)

    def _mark_blocks_filled(self, layer: int, blocks: np.ndarray) -> None:
        """Blocks whose every token ``layer`` now holds."""
        if blocks.size:
            self._filled[blocks, layer] = True
            self._complete[blocks] = self._filled[blocks].all(axis=1)

    def _native_kv(self, key: Any, value: Any, tokens: int | None) -> tuple[Any, Any, int]:
        """K and V as backend arrays of the cache's dtype and ``[n, heads, dim]`` shape."""
        be, c = self._backend, self._config
        out = []
        for what, obj in (("key", key), ("value", value)):
            native = be.asarray(obj, c.device)
            shape, dtype, device = be.describe(native)
            if device != c.device:
                raise DeviceMismatchError(f"{what} is on {device}, the cache is on {c.device}")
            if dtype is not c.dtype:
                seen = dtype.value if dtype is not None else str(getattr(native, "dtype", "?"))
                raise DtypeMismatchError(f"{what} has dtype {seen}, the cache holds "
                                         f"{c.dtype.value}; kvcore does not cast, convert it first")
            want = (tokens if tokens is not None else (shape[0] if shape else -1),
                    c.num_kv_heads, c.head_dim)
            if len(shape) != 3 or tuple(shape) != want or want[0] < 1:
                expect = f"[{tokens if tokens is not None else 'n >= 1'}, {c.num_kv_heads}, {c.head_dim}]"
                raise ShapeMismatchError(f"{what} has shape {list(shape)}, expected {expect} "
                                         "(tokens, num_kv_heads, head_dim)")
            out.append(native)
            tokens = shape[0]
        return out[0], out[1], int(tokens)  # type: ignore[arg-type]

    def write(self, handle: PagedKvCacheHandle | str, layer: int, key: Any, value: Any, *,
              start: int | None = None) -> None:
        """Write K/V of ``n = key.shape[0]`` tokens of one sequence into ``layer``.

        They land at positions ``[start, start + n)``; by default the last ``n``
        positions (what the last ``extend`` reserved).  ``key`` and ``value`` are
        ``[n, num_kv_heads, head_dim]`` arrays of the cache's dtype and device, in the
        backend's library or any library speaking DLPack.  Blocks shared with other
        sequences are copied first.
        """
        with self._lock:
            seq = self._seq_of(handle, "write")
            self._require_data(seq, "write")
            layer = self._check_layer(layer)
            k, v, n = self._native_kv(key, value, None)
            length = seq.table._length
            if start is None:
                start = length - n
            if isinstance(start, bool) or not isinstance(start, (int, np.integer)):
                raise TypeError(f"start must be an int, got {start!r}")
            if start < 0 or start + n > length:
                raise CapacityError(f"writing {n} tokens at position {start} overruns the "
                                    f"sequence of {length} tokens; extend it first")
            written = int(self._written[seq.row, layer])
            if start > written:
                raise WriteOrderError(f"write at position {start} of layer {layer} would "
                                      f"leave positions {written}..{start - 1} unwritten")
            bs = self._config.block_size
            lo, hi = start // bs, -(-(start + n) // bs)
            if lo < seq.private_from or start < written:
                self._make_private(seq, lo, hi, overwrite=start < written)
            slots = _slots_of(seq.blocks(), bs, np.arange(start, start + n, dtype=np.int64))
            index = self._backend.index_array(slots, self._config.device)
            self._layers[layer] = self._backend.scatter(self._layers[layer], index, (k, v))
            self._written[seq.row, layer] = max(written, start + n)
            self._mark_filled(layer, slots)
            seq.last_access = time.time()

    def _make_private(self, seq: _Sequence, lo: int, hi: int, *, overwrite: bool) -> None:
        """Copy-on-write: give ``seq`` its own copy of every block in ``[lo, hi)`` that
        another table shares, or (when overwriting) that the prefix cache holds."""
        pool, blocks = self._pool, seq.table._blocks
        shared = [i for i in range(lo, hi)
                  if pool.ref[blocks[i]] > 1 or (overwrite and pool.is_cached(blocks[i]))]
        if shared:
            if len(shared) > pool.num_free:
                self._failures += 1
                raise OutOfBlocksError(f"copy-on-write for request {seq.request_id!r} needs "
                                       f"{len(shared)} blocks but only {pool.num_free} are free")
            fresh = self._take(len(shared))
            old = [blocks[i] for i in shared]
            self._copy_blocks(old, fresh)
            for i, block in zip(shared, fresh):
                blocks[i] = block
            pool.free(old)
            seq.blocks_changed()
            self._versions[seq.row] += 1
        while seq.private_from > 0 and pool.ref[blocks[seq.private_from - 1]] == 1:
            seq.private_from -= 1

    def write_slots(self, layer: int, slots: SlotMapping, key: Any, value: Any) -> None:
        """Write K/V for every token of a :class:`SlotMapping` into ``layer``: one
        backend call however many sequences the mapping spans (vLLM's
        ``reshape_and_cache``).  ``key``/``value`` are ``[slots.num_tokens, heads, dim]``."""
        if not isinstance(slots, SlotMapping):
            raise TypeError(f"slots must be a SlotMapping from extend/extend_batch, got "
                            f"{type(slots).__name__}")
        with self._lock:
            layer = self._check_layer(layer)
            k, v, _ = self._native_kv(key, value, slots.num_tokens)
            decode = self._decode
            if decode is not None and decode[0] is slots and decode[1][layer]:
                # The last decode step's mapping, nothing moved since and this layer is
                # written up to its starts: the version and order checks hold already.
                self._layers[layer] = self._backend.scatter(
                    self._layers[layer], slots.native(self._backend, self._config.device), (k, v))
                # Its sequences are exactly ``ends`` long (any later extend would have
                # replaced the mapping), so nothing is written beyond: max() is ends.
                self._written[slots.rows, layer] = slots.ends
                self._mark_blocks_filled(layer, decode[2])
                return
            rows = slots.rows
            if not np.array_equal(self._versions[rows], slots.versions):
                stale = [rid for rid, a, b in zip(slots.request_ids, self._versions[rows],
                                                   slots.versions) if a != b]
                raise StaleSlotMappingError(
                    f"the slot mapping of request(s) {stale} is stale: their blocks moved "
                    "(fork, copy-on-write, swap or deallocation) since it was made")
            written = self._written[rows, layer]
            if np.any(slots.starts > written):
                i = int(np.argmax(slots.starts > written))
                raise WriteOrderError(
                    f"request {slots.request_ids[i]!r}: write at position {slots.starts[i]} of "
                    f"layer {layer} would leave positions {written[i]}..{slots.starts[i] - 1} "
                    "unwritten")
            index = slots.native(self._backend, self._config.device)
            self._layers[layer] = self._backend.scatter(self._layers[layer], index, (k, v))
            self._written[rows, layer] = np.maximum(written, slots.ends)
            self._mark_filled(layer, slots.slots)

    # --- reads --------------------------------------------------------------------------

    def _num_written(self, seq: _Sequence, layer: int) -> int:
        with self._lock:
            self._require_live(seq, "num_written")
            return int(self._written[seq.row, self._check_layer(layer)])

    def _read_index(self, seq: _Sequence, n: int) -> Any:
        key = (int(self._versions[seq.row]), n)
        if seq.read_key != key:
            bs = self._config.block_size
            slots = _slots_of(seq.blocks(), bs, np.arange(n, dtype=np.int64))
            seq.read_index = self._backend.index_array(slots, self._config.device)
            seq.read_key = key
        return seq.read_index

    def _read(self, seq: _Sequence, layer: int, kv: int) -> TensorRef | None:
        with self._lock:
            self._require_data(seq, "key_cache" if kv == 0 else "value_cache")
            layer = self._check_layer(layer)
            n = int(self._written[seq.row, layer])
            if n == 0:
                return None
            c = self._config
            array = self._backend.gather(self._layers[layer], kv, self._read_index(seq, n))
            seq.last_access = time.time()
            return TensorRef(array, (n, c.num_kv_heads, c.head_dim), c.dtype, c.device,
                             self._backend)

    def _read_pair(self, seq: _Sequence, layer: int) -> tuple[TensorRef, TensorRef] | None:
        with self._lock:
            key = self._read(seq, layer, 0)
            return None if key is None else (key, self._read(seq, layer, 1))  # type: ignore[return-value]
