"""KvCacheManager: the backend-neutral paged KV cache.

The manager owns one block pool per device (the main pool, and optionally a swap
pool), the block tables of every live sequence, the prefix cache and the statistics.
Backends only move array data, in bulk (see :mod:`kvcore._backend`).

Reading order: allocation (with prefix caching), extension and writes (with
copy-on-write), reads, fork/deallocate, swap, and the read-only exports at the end.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ._backend import Backend
from ._block_pool import BlockPool
from ._block_table import BlockTable, _slots_of
from ._introspection import IntrospectionMixin
from ._paged_handle import PagedKvCacheHandle
from ._swap import SwapMixin
from ._prefix_cache import ChainHasher, PrefixPlan, plan_prefix, token_array
from ._sequence import _managed_table, _Sequence
from ._registry import get_backend
from ._slot_mapping import SlotMapping
from ._tensor_ref import TensorRef
from .errors import (CapacityError, DeviceMismatchError, DtypeMismatchError,
                     DuplicateRequestError, HandleSwappedError, InvalidHandleError,
                     LayerIndexError, OutOfBlocksError, ShapeMismatchError,
                     StaleSlotMappingError, UnknownRequestError, UnsupportedError,
                     WriteOrderError)
from .models import (AllocationRequest, CacheConfig, CacheManagerStats, MemoryPressure)

__all__ = ["KvCacheManager"]

PressureCallback = Callable[[MemoryPressure, CacheManagerStats], None]


def _check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


class KvCacheManager(SwapMixin, IntrospectionMixin):
    """A paged K/V cache for one model shape, on one backend.

    >>> cfg = CacheConfig(num_layers=2, num_kv_heads=4, head_dim=8, num_blocks=64)
    >>> mgr = KvCacheManager(cfg, backend="numpy")

    Thread-safe: every public method holds one re-entrant lock.
    """

    def __init__(self, config: CacheConfig, backend: str | Backend | None = None, *,
                 on_pressure: PressureCallback | None = None) -> None:
        if not isinstance(config, CacheConfig):
            raise TypeError(f"config must be a kvcore.CacheConfig, got {type(config).__name__}")
        self._backend = backend if isinstance(backend, Backend) else get_backend(backend)
        self._config = config
        be, c = self._backend, config
        be.check_dtype(c.dtype)
        be.check_device(c.device)
        self._layers = [be.allocate_layer(c.num_blocks, c.block_size, c.num_kv_heads,
                                          c.head_dim, c.dtype, c.device)
                        for _ in range(c.num_layers)]
        self._pool = BlockPool(c.num_blocks, c.block_size)
        self._hasher = ChainHasher(c.block_size, c.hash_seed)
        self._swap_pool: BlockPool | None = None
        self._swap_layers: list[Any] = []
        if c.swap_blocks:
            if c.swap_device.type not in be.capabilities().swap_device_types:
                raise UnsupportedError(f"backend {be.name!r} cannot swap to {c.swap_device}")
            pinned = c.device.is_cuda and not c.swap_device.is_cuda
            self._swap_layers = [be.allocate_layer(c.swap_blocks, c.block_size, c.num_kv_heads,
                                                   c.head_dim, c.dtype, c.swap_device,
                                                   pinned=pinned)
                                 for _ in range(c.num_layers)]
            self._swap_pool = BlockPool(c.swap_blocks, c.block_size)
        self._seqs: dict[str, _Sequence] = {}
        # Per-sequence rows: tokens written per layer, and a version bumped whenever
        # the sequence's existing slots move (copy-on-write, fork, swap, free).
        self._written = np.zeros((16, c.num_layers), dtype=np.int64)
        self._versions = np.zeros(16, dtype=np.int64)
        self._free_rows = list(range(15, -1, -1))
        # Per physical block: which layers hold its full block_size tokens, and whether
        # all of them do.  Only complete blocks are served from the prefix cache, so a
        # hit never returns K/V that nobody has written yet.
        self._filled = np.zeros((c.num_blocks, c.num_layers), dtype=bool)
        self._complete = np.zeros(c.num_blocks, dtype=bool)
        # The SlotMapping of the last extend_batch, with what write_slots would otherwise
        # recompute on every layer (see _remember_mapping); None once anything moves.
        self._decode: tuple[SlotMapping, np.ndarray, np.ndarray] | None = None
        self._lock = threading.RLock()
        self._on_pressure = on_pressure
        self._pressure = MemoryPressure.low
        self._queries = self._hits = self._allocations = self._failures = self._cow = 0

    # --- properties -----------------------------------------------------------------

    @property
    def config(self) -> CacheConfig:
        return self._config

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def block_size(self) -> int:
        return self._config.block_size

    # --- rows -------------------------------------------------------------------------

    def _take_row(self) -> int:
        if not self._free_rows:
            old = self._written.shape[0]
            self._written = np.concatenate([self._written, np.zeros_like(self._written)])
            self._versions = np.concatenate([self._versions, np.zeros_like(self._versions)])
            self._free_rows = list(range(2 * old - 1, old - 1, -1))
        return self._free_rows.pop()

    def _release_row(self, row: int) -> None:
        self._decode = None
        self._written[row] = 0
        self._versions[row] += 1
        self._free_rows.append(row)

    def _take(self, count: int) -> list[int]:
        """Fresh blocks from the pool; whatever they held before is not theirs."""
        blocks = self._pool.allocate(count)
        if blocks:
            self._filled[blocks] = False
            self._complete[blocks] = False
        return blocks

    def _mark_filled(self, layer: int, slots: np.ndarray) -> None:
        """Record blocks that a write to ``layer`` completed.  Writes always extend a
        written prefix, so writing a block's last slot means the whole block is there."""
        bs = self._config.block_size
        done = slots[slots % bs == bs - 1] // bs
        if done.size:
            self._filled[done, layer] = True
            self._complete[done] = self._filled[done].all(axis=1)

    def _after_change(self) -> None:
        # Every operation that moves a sequence's slots (fork, swap, free, copy-on-write)
        # ends here, so the remembered decode mapping can no longer be trusted.
        self._decode = None
        super()._after_change()

    # --- lookups ------------------------------------------------------------------------

    def _require_live(self, seq: _Sequence, op: str) -> None:
        if not seq.valid:
            raise InvalidHandleError(f"{op}: the cache of request {seq.request_id!r} was "
                                     "deallocated; this handle is no longer valid")

    def _require_data(self, seq: _Sequence, op: str) -> None:
        self._require_live(seq, op)
        if seq.swap_blocks is not None:
            raise HandleSwappedError(f"{op}: request {seq.request_id!r} is swapped out; "
                                     "call swap_in first")

    def _seq_of(self, handle: PagedKvCacheHandle | str, op: str) -> _Sequence:
        if isinstance(handle, str):
            seq = self._seqs.get(handle)
            if seq is None:
                raise UnknownRequestError(f"{op}: no live cache has request id {handle!r}")
            return seq
        if not isinstance(handle, PagedKvCacheHandle):
            raise TypeError(f"{op}: expected a handle or a request id, got "
                            f"{type(handle).__name__}")
        if handle._manager is not self:
            raise InvalidHandleError(f"{op}: handle of request {handle.request_id!r} belongs "
                                     "to a different manager")
        self._require_live(handle._seq, op)
        return handle._seq

    def _check_layer(self, layer: Any) -> int:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise TypeError(f"layer must be an int, got {layer!r}")
        if not 0 <= layer < self._config.num_layers:
            raise LayerIndexError(f"layer {layer} is out of range: the cache has "
                                  f"{self._config.num_layers} layers (0..{self._config.num_layers - 1})")
        return int(layer)

    def _handle(self, seq: _Sequence) -> PagedKvCacheHandle:
        return self._backend.handle_class(self, seq)

    def get_handle(self, request_id: str) -> PagedKvCacheHandle:
        """A new handle to the live cache of ``request_id``."""
        with self._lock:
            return self._handle(self._seq_of(request_id, "get_handle"))

    def list_handles(self) -> list[PagedKvCacheHandle]:
        """One handle per live cache, in allocation order."""
        with self._lock:
            return [self._handle(s) for s in self._seqs.values()]

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._seqs

    def __len__(self) -> int:
        return len(self._seqs)

    # --- allocation ---------------------------------------------------------------------

    def _prefix_plan(self, request: AllocationRequest) -> PrefixPlan:
        return plan_prefix(self._pool, self._hasher, request,
                           self._config.enable_prefix_caching, self._complete)

    def can_allocate(self, request: AllocationRequest) -> bool:
        """Whether :meth:`allocate` would succeed now (prefix hits counted).  Changes
        nothing, not even the statistics."""
        if not isinstance(request, AllocationRequest):
            raise TypeError(f"expected an AllocationRequest, got {type(request).__name__}")
        with self._lock:
            if request.request_id in self._seqs:
                return False
            total, hits, _, _ = self._prefix_plan(request)
            reclaimed = self._pool.count_free(hits)
            return total - len(hits) <= self._pool.num_free - reclaimed

    def allocate(self, request: AllocationRequest) -> PagedKvCacheHandle:
        """Reserve a cache for ``request.num_tokens`` tokens and return its handle.

        With ``prompt_token_ids`` and prefix caching on, leading full blocks already in
        the cache are shared; ``handle.num_cached_tokens()`` says how many tokens that
        covers (their K/V are already there for every layer).
        """
        if not isinstance(request, AllocationRequest):
            raise TypeError(f"expected an AllocationRequest, got {type(request).__name__}")
        with self._lock:
            rid = request.request_id
            if rid in self._seqs:
                raise DuplicateRequestError(f"request id {rid!r} already has a live cache")
            total, hits, keys, rows = self._prefix_plan(request)
            pool = self._pool
            reclaimed = pool.count_free(hits)
            need = total - len(hits)
            if need > pool.num_free - reclaimed:
                self._failures += 1
                raise OutOfBlocksError(
                    f"request {rid!r} needs {need} new blocks ({request.num_tokens} tokens, "
                    f"{len(hits)} blocks from the prefix cache) but only "
                    f"{pool.num_free - reclaimed} are free")
            pool.acquire(hits)
            blocks = hits + self._take(need)
            bs = self._config.block_size
            if rows is not None:
                pool.register_run(blocks, keys, rows, len(hits))
                self._queries += len(keys)
                self._hits += len(hits)
            self._allocations += 1
            row = self._take_row()
            seq = _Sequence(rid, BlockTable(bs), row)
            seq.table = _managed_table(bs, blocks, request.num_tokens or 0,
                                       self._grower(seq))
            seq.num_cached_tokens = len(hits) * bs
            seq.private_from = len(hits)
            self._written[row] = seq.num_cached_tokens
            if rows is not None:
                seq.hashing = True
                seq.parent_hash = keys[-1] if keys else self._hasher.root(request.extra_key)
                seq.num_hashed_blocks = len(keys)
                seq.pending_tokens = list(request.prompt_token_ids[len(keys) * bs:])  # type: ignore[index]
            self._seqs[rid] = seq
            self._after_change()
            return self._handle(seq)

    def _grower(self, seq: _Sequence) -> Callable[[int], Any]:
        return lambda n: self.extend(self._handle(seq), n)

    # --- extension ----------------------------------------------------------------------

    def extend(self, handle: PagedKvCacheHandle | str, num_tokens: int, *,
               token_ids: Sequence[int] | None = None) -> SlotMapping:
        """Reserve room for ``num_tokens`` more tokens; returns their slots.

        Pass ``token_ids`` to keep prefix-caching the blocks they fill.  A shared last
        block is copied first (copy-on-write).  All or nothing: on
        :class:`~kvcore.errors.OutOfBlocksError` nothing changed.
        """
        return self.extend_batch([handle], num_tokens,
                                 token_ids=None if token_ids is None else [token_ids])

    def extend_batch(self, handles: Sequence[PagedKvCacheHandle | str], num_tokens: int = 1,
                     *, token_ids: Sequence[Sequence[int]] | None = None) -> SlotMapping:
        """:meth:`extend` for many sequences at once (one decode step of a batch).

        One :class:`SlotMapping` covers them all, sequences in the order given; the
        copy-on-write copies of the whole batch are one backend call per layer.
        """
        n = _check_positive("num_tokens", num_tokens)
        with self._lock:
            self._decode = None
            seqs = self._live_batch(handles)
            if len(set(map(id, seqs))) != len(seqs):
                raise ValueError("extend_batch: a sequence appears more than once in the batch")
            if token_ids is not None:
                if len(token_ids) != len(seqs):
                    raise ValueError(f"token_ids has {len(token_ids)} entries for "
                                     f"{len(seqs)} sequences")
                for ids in token_ids:
                    if len(ids) != n:
                        raise ValueError(f"token_ids entry of length {len(ids)} differs from "
                                         f"num_tokens={n}")
            if n == 1 and token_ids is None:
                mapping = self._extend_one(seqs)
                if mapping is not None:
                    return mapping
            pool = self._pool
            cow = [s.table.has_free_space and s.table._blocks and
                   pool.ref[s.table._blocks[-1]] > 1 for s in seqs]
            need = sum(s.table.additional_blocks_for(n) for s in seqs) + sum(map(bool, cow))
            if need > pool.num_free:
                self._failures += 1
                raise OutOfBlocksError(f"extending {len(seqs)} sequence(s) by {n} tokens needs "
                                       f"{need} blocks but only {pool.num_free} are free")
            # From here on nothing can fail: the pool has room for everything.
            src: list[int] = []
            dst: list[int] = []
            starts = []
            for seq, copy in zip(seqs, cow):
                table = seq.table
                if copy:
                    new = self._take(1)[0]
                    src.append(table._blocks[-1])
                    dst.append(new)
                    pool.free([table._blocks[-1]])
                    table._blocks[-1] = new
                    seq.private_from = min(seq.private_from, len(table._blocks) - 1)
                    self._versions[seq.row] += 1
                grow = table.additional_blocks_for(n)
                if grow:
                    table._blocks.extend(self._take(grow))
                starts.append(table._length)
                table._length += n
                seq.blocks_changed()
                seq.last_access = time.time()
            if src:
                self._copy_blocks(src, dst)
            if self._config.enable_prefix_caching:
                for i, seq in enumerate(seqs):
                    if seq.hashing:
                        self._hash_new_blocks(seq, None if token_ids is None else token_ids[i])
            mapping = self._mapping(seqs, starts, n)
            self._after_change()
            return mapping

    def _live_batch(self, handles: Sequence[PagedKvCacheHandle | str]) -> list[_Sequence]:
        """The sequences of ``handles``, all live and resident, else the error the
        one-by-one checks raise.  The common case (this manager's own handles) costs
        two attribute reads per handle."""
        cls = self._backend.handle_class
        seqs = []
        append = seqs.append
        for h in handles:
            if type(h) is cls and h._manager is self:
                seq = h._seq
                if seq.valid and seq.swap_blocks is None:
                    append(seq)
                    continue
            break
        else:
            return seqs
        seqs = [self._seq_of(h, "extend") for h in handles]
        for seq in seqs:
            self._require_data(seq, "extend")
        return seqs

    def _extend_one(self, seqs: list[_Sequence]) -> SlotMapping | None:
        """The decode step: every sequence grows by one token, none shares its last
        block.  Same result as the general path (same blocks, taken in the same order,
        same errors) in one pass per sequence instead of a dozen method calls; returns
        ``None`` (having changed nothing) when a sequence needs copy-on-write."""
        bs = self._config.block_size
        ref = self._pool.ref
        growing: list[_Sequence] = []
        for seq in seqs:
            table = seq.table
            blocks = table._blocks
            if table._length == len(blocks) * bs:
                growing.append(seq)
            elif ref[blocks[-1]] > 1:
                return None  # copy-on-write: the general path handles it
        pool = self._pool
        if len(growing) > pool.num_free:
            self._failures += 1
            raise OutOfBlocksError(f"extending {len(seqs)} sequence(s) by 1 tokens needs "
                                   f"{len(growing)} blocks but only {pool.num_free} are free")
        if growing:
            for seq, block in zip(growing, self._take(len(growing))):
                seq.table._blocks.append(block)
                seq.block_arr = None
                seq.read_key = None
        now = time.time()
        starts = []
        slots = []
        completes = []  # blocks whose last slot this step writes
        last = bs - 1
        for seq in seqs:
            table = seq.table
            length = table._length
            starts.append(length)
            block = table._blocks[length // bs]
            offset = length % bs
            slots.append(block * bs + offset)
            if offset == last:
                completes.append(block)
            table._length = length + 1
            seq.last_access = now
        if self._config.enable_prefix_caching:
            for seq in seqs:
                if seq.hashing:  # no token ids: the chain is broken
                    self._hash_new_blocks(seq, None)
        rows = np.array([s.row for s in seqs], dtype=np.int64)
        start_arr = np.array(starts, dtype=np.int64)
        mapping = SlotMapping(slots=np.array(slots, dtype=np.int64), rows=rows,
                              starts=start_arr, ends=start_arr + 1,
                              versions=self._versions[rows],
                              request_ids=tuple([s.request_id for s in seqs]))
        self._after_change()
        # Precompute, once per step, what write_slots would check on every layer.
        # Which layers are written up to the starts, so writing leaves no gap: written
        # never exceeds a sequence's length (= its start here), so "every row is
        # written up to its start" is "the written counts sum to the starts' sum".
        ok = self._written[rows].sum(axis=0) == sum(starts)
        done = np.array(completes, dtype=np.int64)
        # Valid until something moves a slot (_after_change) or another extend.
        self._decode = (mapping, ok, done)
        return mapping

    def _copy_blocks(self, src: list[int], dst: list[int]) -> None:
        be, device = self._backend, self._config.device
        src_i = be.index_array(np.asarray(src, dtype=np.int64), device)
        dst_i = be.index_array(np.asarray(dst, dtype=np.int64), device)
        for layer in self._layers:
            be.copy_blocks(layer, src_i, dst_i)
        self._filled[dst] = self._filled[src]
        self._complete[dst] = self._complete[src]
        self._cow += len(src)

    def _hash_new_blocks(self, seq: _Sequence, token_ids: Sequence[int] | None) -> None:
        if token_ids is None:  # the chain is broken: later blocks can't be cached
            seq.hashing = False
            seq.pending_tokens = []
            return
        pending = seq.pending_tokens
        pending.extend(int(t) for t in token_ids)
        bs = self._config.block_size
        full = len(pending) // bs
        if full:
            rows = token_array(pending[:full * bs]).reshape(full, bs)
            keys = self._hasher.keys(rows, seq.parent_hash).tolist()
            first = seq.num_hashed_blocks
            self._pool.register_run(seq.table._blocks[first:first + full], keys, rows, 0)
            seq.parent_hash = keys[-1]
            seq.num_hashed_blocks += full
            del pending[:full * bs]

    def _mapping(self, seqs: list[_Sequence], starts: list[int], n: int) -> SlotMapping:
        bs = self._config.block_size
        if n == 1:  # the decode step: one slot per sequence, no arrays per sequence
            slots = np.fromiter((s.table._blocks[p // bs] * bs + p % bs
                                 for s, p in zip(seqs, starts)), dtype=np.int64, count=len(seqs))
        else:
            slots = np.concatenate([
                _slots_of(s.blocks(), bs, np.arange(p, p + n, dtype=np.int64))
                for s, p in zip(seqs, starts)]) if seqs else np.zeros(0, np.int64)
        rows = np.fromiter((s.row for s in seqs), dtype=np.int64, count=len(seqs))
        start_arr = np.asarray(starts, dtype=np.int64)
        return SlotMapping(slots=slots, rows=rows, starts=start_arr, ends=start_arr + n,
                           versions=self._versions[rows].copy(),
                           request_ids=tuple(s.request_id for s in seqs))

    # --- writes -------------------------------------------------------------------------

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
            self._backend.scatter(self._layers[layer], index, k, v)
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
                self._backend.scatter(self._layers[layer],
                                      slots.native(self._backend, self._config.device), k, v)
                # Its sequences are exactly ``ends`` long (any later extend would have
                # replaced the mapping), so nothing is written beyond: max() is ends.
                self._written[slots.rows, layer] = slots.ends
                done = decode[2]
                if done.size:
                    self._filled[done, layer] = True
                    self._complete[done] = self._filled[done].all(axis=1)
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
            self._backend.scatter(self._layers[layer], index, k, v)
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
            return TensorRef(array, (n, c.num_kv_heads, c.head_dim), c.dtype, c.device)

    def _read_pair(self, seq: _Sequence, layer: int) -> tuple[TensorRef, TensorRef] | None:
        with self._lock:
            key = self._read(seq, layer, 0)
            return None if key is None else (key, self._read(seq, layer, 1))  # type: ignore[return-value]

    # --- fork, deallocate -----------------------------------------------------------------

    def truncate(self, handle: PagedKvCacheHandle | str, num_tokens: int) -> None:
        """Shorten a sequence to its first ``num_tokens`` tokens (speculative decoding
        rolling back rejected draft tokens; transformers' ``Cache.crop``).

        Blocks past the new end go back to the pool.  If the new last block is partly
        used and shared with another sequence or held by the prefix cache, the sequence
        gets its own copy first, so the tokens it writes next never change anyone
        else's data.  All or nothing.
        """
        with self._lock:
            seq = self._seq_of(handle, "truncate")
            self._require_data(seq, "truncate")
            length = seq.table._length
            if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, np.integer)):
                raise TypeError(f"num_tokens must be an int, got {num_tokens!r}")
            if not 0 <= num_tokens <= length:
                raise CapacityError(f"cannot truncate request {seq.request_id!r} to "
                                    f"{num_tokens} tokens: it holds {length}")
            num_tokens = int(num_tokens)
            if num_tokens == length:
                return
            pool, bs = self._pool, self._config.block_size
            blocks = seq.table._blocks
            keep = -(-num_tokens // bs)
            dropped = blocks[keep:]
            last = blocks[keep - 1] if keep and num_tokens % bs else None
            copy = last is not None and (pool.ref[last] > 1 or pool.is_cached(last))
            if copy and pool.num_free + pool.count_free_after(dropped) < 1:
                self._failures += 1
                raise OutOfBlocksError(f"truncating request {seq.request_id!r} needs one "
                                       "block to copy its shared last block; none is free")
            # From here on nothing can fail.
            del blocks[keep:]
            pool.free(dropped)
            if copy:
                fresh = self._take(1)
                self._copy_blocks([last], fresh)  # type: ignore[list-item]
                blocks[keep - 1] = fresh[0]
                pool.free([last])  # type: ignore[list-item]
                last = fresh[0]
            if last is not None:
                # Its tail will be written again: it is no longer complete for any layer.
                self._filled[last] = False
                self._complete[last] = False
            seq.table._length = num_tokens
            np.minimum(self._written[seq.row], num_tokens, out=self._written[seq.row])
            seq.num_cached_tokens = min(seq.num_cached_tokens, num_tokens)
            seq.private_from = min(seq.private_from, keep - 1 if copy else keep)
            if seq.hashing:
                hashed = seq.num_hashed_blocks * bs
                if num_tokens < hashed:  # the chain cannot be rewound: stop caching it
                    seq.hashing = False
                    seq.pending_tokens = []
                else:
                    del seq.pending_tokens[num_tokens - hashed:]
            seq.blocks_changed()
            self._versions[seq.row] += 1
            self._after_change()

    def fork(self, handle: PagedKvCacheHandle | str, new_request_id: str) -> PagedKvCacheHandle:
        """A copy-on-write child of ``handle`` under ``new_request_id`` (beam search,
        parallel sampling).  Costs O(blocks): no data is copied until one side writes
        into a shared block."""
        if not isinstance(new_request_id, str) or not new_request_id:
            raise ValueError(f"new_request_id must be a non-empty str, got {new_request_id!r}")
        with self._lock:
            parent = self._seq_of(handle, "fork")
            self._require_data(parent, "fork")
            if new_request_id in self._seqs:
                raise DuplicateRequestError(f"request id {new_request_id!r} already has a "
                                            "live cache")
            blocks = list(parent.table._blocks)
            self._pool.incref(blocks)
            row = self._take_row()
            child = _Sequence(new_request_id, BlockTable(self._config.block_size), row)
            child.table = _managed_table(self._config.block_size, blocks,
                                         parent.table._length, self._grower(child))
            self._written[row] = self._written[parent.row]
            child.num_cached_tokens = parent.num_cached_tokens
            child.hashing, child.parent_hash = parent.hashing, parent.parent_hash
            child.num_hashed_blocks = parent.num_hashed_blocks
            child.pending_tokens = list(parent.pending_tokens)
            parent.private_from = child.private_from = len(blocks)
            self._versions[parent.row] += 1  # its pending slots now point at shared blocks
            self._seqs[new_request_id] = child
            self._allocations += 1
            self._after_change()
            return self._handle(child)

    def deallocate(self, handle: PagedKvCacheHandle | str) -> None:
        """End a request: every handle to it becomes invalid; its blocks return to the
        pool once no other table holds them (prefix-cached ones stay reusable until
        evicted)."""
        with self._lock:
            if isinstance(handle, PagedKvCacheHandle):
                seq = self._seq_of(handle, "deallocate")
            else:
                if not isinstance(handle, str):
                    raise TypeError(f"deallocate: expected a handle or a request id, got "
                                    f"{type(handle).__name__}")
                seq = self._seqs.get(handle)  # type: ignore[assignment]
                if seq is None:
                    raise UnknownRequestError(f"deallocate: no live cache has request id "
                                              f"{handle!r} (already deallocated?)")
            del self._seqs[seq.request_id]
            seq.valid = False
            if seq.swap_blocks is not None:
                self._swap_pool.free(seq.swap_blocks)  # type: ignore[union-attr]
                seq.swap_blocks = None
            else:
                self._pool.free(seq.table._blocks)
            self._release_row(seq.row)
            self._after_change()

    def __repr__(self) -> str:
        c = self._config
        return (f"KvCacheManager(backend={self._backend.name!r}, layers={c.num_layers}, "
                f"kv_heads={c.num_kv_heads}, head_dim={c.head_dim}, dtype={c.dtype.value}, "
                f"blocks={c.num_blocks}x{c.block_size}, device={c.device}, "
                f"live={len(self._seqs)})")
