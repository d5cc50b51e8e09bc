"""KvCacheManager: the backend-neutral paged KV cache, a facade over its parts.

The manager checks every argument, takes its lock, and orders the parts that do the
work (see :mod:`kvcore._coordinator`): allocation, extension and truncation
(:mod:`kvcore._growth`), writes and reads (:mod:`kvcore._writes`), swap
(:mod:`kvcore._swap`), statistics, invariants and page tables
(:mod:`kvcore._introspection`).  Backends only move array data, in bulk
(:mod:`kvcore._backend`).

Every refusal happens before anything changes, so a refused call leaves the cache
exactly as it was.
"""

from __future__ import annotations

import operator
import os
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _introspection as intro
from ._backend import Backend
from ._batch_read import BatchKv, BatchLayout, check_layout, read_batch
from ._block_table import BlockTable
from ._coordinator import Coordinator
from ._growth import commit_allocation, extend_rows, plan_allocation, truncate_row
from ._paged_handle import PagedKvCacheHandle
from . import _persist
from ._registry import device_types_served, get_backend
from ._directory import SequenceDirectory
from ._handle_access import SequenceAccess
from ._sequence_table import SequenceRecord
from ._swapping import require_swap, swap_in_sequence, swap_out_sequence
from ._slot_mapping import FlashInferPageTable, SlotMapping, VllmBlockTable
from ._tensor_ref import TensorRef
from ._writes import (FastPath, prepare_fast_path, settle, write_fast, write_mapping,
                      write_range)
from .errors import (CacheError, CapacityError, DuplicateRequestError, HandleSwappedError,
                     InvalidHandleError, LayerIndexError, ManagerClosedError, NotCopyableError,
                     OutOfBlocksError, PendingPrefixError, StaleSlotMappingError,
                     UnknownRequestError, UnsupportedError)
from .models import (AllocationRequest, CacheConfig, CacheGcStats, CacheHandleStats,
                     CacheManagerStats, MemoryPressure)

if TYPE_CHECKING:
    from ._store_link import StoreLink
    from .stores import StoreStats

__all__ = ["KvCacheManager"]

PressureCallback = Callable[[MemoryPressure, CacheManagerStats], None]
Handle = PagedKvCacheHandle | str


class KvCacheManager:
    """A paged K/V cache for one model shape, on one backend.

    >>> cfg = CacheConfig(num_layers=2, num_kv_heads=4, head_dim=8, num_blocks=64)
    >>> with KvCacheManager(cfg, backend="numpy") as mgr:
    ...     h = mgr.allocate(AllocationRequest(request_id="a", num_tokens=3))

    Thread-safe: every public method holds one re-entrant lock.  ``close()`` (or the
    end of a ``with`` block) releases the pools; afterwards every handle is invalid
    and every call raises :class:`~kvcore.errors.ManagerClosedError`.
    """

    def __init__(self, config: CacheConfig, backend: str | Backend | None = None, *,
                 on_pressure: PressureCallback | None = None) -> None:
        if not isinstance(config, CacheConfig):
            raise TypeError(f"config must be a kvcore.CacheConfig, got {type(config).__name__}")
        if on_pressure is not None and not callable(on_pressure):
            raise TypeError(f"on_pressure must be callable(level, stats) or None, got "
                            f"{on_pressure!r}")
        if backend is not None and not isinstance(backend, (str, Backend)):
            raise TypeError(f"backend must be a backend name, a kvcore.Backend or None, got "
                            f"{type(backend).__name__}")
        be = backend if isinstance(backend, Backend) else get_backend(backend)
        be.check_cache_dtypes(config.dtype, config.compute_dtype)  # type: ignore[arg-type]
        try:
            be.check_device(config.device)
        except UnsupportedError as exc:
            raise UnsupportedError(f"{exc}. {device_types_served()}") from None
        self._config = config
        self._backend = be
        self._co = Coordinator(config, be)
        #: Block digests and the store (kvcore._store_link), when the config asks.
        self._link: StoreLink | None = None
        if config.store is not None or config.crypto_block_keys:
            from ._store_link import open_link
            try:
                self._link = self._co.link = open_link(self._co, config, be)
            except BaseException:
                self._co.close()
                raise
        self._token = object()  # the identity every SlotMapping of this manager carries
        self._dir = SequenceDirectory(self, be.handle_class, self._co.tables)
        self._seqs = self._dir.seqs
        self._fast: FastPath | None = None
        # The last batch extend_batch checked: (epoch, handles, rows, request ids).
        self._last_batch: tuple[int, tuple[Any, ...], np.ndarray, tuple[str, ...]] | None = None
        self._num_layers = config.num_layers
        self._lock = threading.RLock()
        #: What this manager's handles read through (the HandleHost protocol).
        self._access = SequenceAccess(self._lock, self._dir, self._co, self._settle,
                                      self._check_layer)
        self._on_pressure = on_pressure
        self._pressure = MemoryPressure.low
        self._used = 0
        self._closed = False

    # --- properties ---------------------------------------------------------------

    @property
    def config(self) -> CacheConfig:
        return self._config

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def block_size(self) -> int:
        return self._config.block_size

    @property
    def closed(self) -> bool:
        return self._closed

    # --- lifecycle ----------------------------------------------------------------

    def close(self) -> None:
        """Release every pool through the backend.  Every handle becomes invalid and
        every later call raises :class:`~kvcore.errors.ManagerClosedError`.  Closing
        twice is a no-op."""
        with self._lock:
            if self._closed:
                return
            self._closed = self._dir.closed = True
            for seq in self._seqs.values():
                seq.valid = False
            self._seqs.clear()
            self._fast = None
            self._last_batch = None
            try:
                if self._link is not None:
                    self._link.close()  # sends what is queued (bounded), closes the store
            finally:
                self._co.close()

    def __enter__(self) -> KvCacheManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __copy__(self) -> KvCacheManager:
        raise NotCopyableError("a KvCacheManager owns device memory and a lock and is not "
                               "copied or pickled: fork sequences with manager.fork(...), "
                               "or save them with manager.save(path, handles) and load "
                               "them into another manager with its load(path)")

    def __deepcopy__(self, memo: dict[int, Any]) -> KvCacheManager:
        return self.__copy__()

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self.__copy__()

    # --- lookups ------------------------------------------------------------------

    def _check_open(self, op: str) -> None:
        """Refuse calls on a closed manager, and bring the books up to date first (every
        locked public method starts here)."""
        if self._closed:
            raise ManagerClosedError(f"{op}: the manager was closed; its pools are released")
        self._settle()

    def _settle(self) -> None:
        """Apply the books of fast-path writes (see :class:`~kvcore._writes.FastPath`)."""
        fast = self._fast
        if fast is not None and fast.pending:
            settle(self._co, fast)

    def _require_resident(self, seq: SequenceRecord, op: str) -> None:
        self._dir.require_resident(seq, op)

    def _seq_of(self, handle: Any, op: str) -> SequenceRecord:
        self._check_open(op)
        return self._dir.seq_of(handle, op)

    def _batch(self, handles: Any, op: str) -> list[SequenceRecord]:
        self._check_open(op)
        return self._dir.batch(handles, op)

    @staticmethod
    def _check_layer_of(layer: Any, num_layers: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise TypeError(f"layer must be an int, got {layer!r}")
        if not 0 <= layer < num_layers:
            raise LayerIndexError(f"layer {layer} is out of range: the cache has "
                                  f"{num_layers} layers (0..{num_layers - 1})")
        return int(layer)

    def _check_layer(self, layer: Any) -> int:
        return self._check_layer_of(layer, self._config.num_layers)

    def _handle(self, seq: SequenceRecord) -> PagedKvCacheHandle:
        return self._backend.handle_class(self, seq)

    def get_handle(self, request_id: str) -> PagedKvCacheHandle:
        """A new handle to the live cache of ``request_id``."""
        with self._lock:
            if not isinstance(request_id, str):
                raise TypeError(f"get_handle: expected a request id (str), got "
                                f"{type(request_id).__name__}")
            return self._handle(self._seq_of(request_id, "get_handle"))

    def list_handles(self) -> list[PagedKvCacheHandle]:
        """One handle per live cache, in allocation order."""
        with self._lock:
            return [self._handle(s) for s in self._seqs.values()]

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._seqs

    def __len__(self) -> int:
        return len(self._seqs)

    # --- allocation -----------------------------------------------------------------

    def can_allocate(self, request: AllocationRequest) -> bool:
        """Whether :meth:`allocate` would succeed now (prefix hits counted).  Changes
        nothing, not even the statistics."""
        if not isinstance(request, AllocationRequest):
            raise TypeError(f"expected an AllocationRequest, got {type(request).__name__}")
        with self._lock:
            self._check_open("can_allocate")
            if request.request_id in self._seqs:
                return False
            return plan_allocation(self._co, request).fits(self._co)

    def allocate(self, request: AllocationRequest) -> PagedKvCacheHandle:
        """Reserve a cache for ``request.num_tokens`` tokens and return its handle.

        With ``prompt_token_ids`` and prefix caching on, leading full blocks already in
        the cache are shared; ``handle.num_cached_tokens()`` says how many tokens that
        covers (their K/V are already there for every layer, or, with
        ``join_pending``, are being written in the same step).
        """
        if not isinstance(request, AllocationRequest):
            raise TypeError(f"expected an AllocationRequest, got {type(request).__name__}")
        with self._lock:
            self._check_open("allocate")
            co = self._co
            rid = request.request_id
            if rid in self._seqs:
                raise DuplicateRequestError(f"request id {rid!r} already has a live cache")
            plan = plan_allocation(co, request)
            for g, (need, free) in zip(co.groups, plan.room_needed(co)):
                if need > free:
                    co.counters.failures += 1
                    where = f" in layer group {g.layout.index}" if len(co.groups) > 1 else ""
                    raise OutOfBlocksError(
                        f"request {rid!r} needs {need} new blocks{where} "
                        f"({request.num_tokens} tokens, {plan.hits} blocks from the prefix "
                        f"cache) but only {free} are free")
            link = self._link
            # The store's blocks after the local hits (one round trip), before anything
            # changes: room for them is part of the plan, a fault is a miss.
            fetched = link.prepare(co, plan, request) if link is not None else None
            row = co.tables.take_row()
            commit_allocation(co, plan, row, request.num_tokens or 0)
            seq = SequenceRecord(rid, row, co.tables, self._grow, co.primary.layout.index)
            self._seqs[rid] = seq
            if fetched is not None:
                try:
                    link.committed(co, plan, row, fetched)  # type: ignore[union-attr]
                except BaseException:
                    self.deallocate(rid)  # a backend failing mid-load: give it all back
                    raise
            self._after_change()
            return self._handle(seq)

    def _grow(self, seq: SequenceRecord, num_tokens: int) -> None:
        """What a managed block table's ``extend_sequence`` does."""
        self.extend(self._handle(seq), num_tokens)

    # --- fork, deallocate -------------------------------------------------------------

    def fork(self, handle: Handle, new_request_id: str) -> PagedKvCacheHandle:
        """A copy-on-write child of ``handle`` under ``new_request_id`` (beam search,
        parallel sampling).  Costs O(blocks): no data is copied until one side writes
        into a shared block."""
        if not isinstance(new_request_id, str) or not new_request_id:
            raise ValueError(f"new_request_id must be a non-empty str, got {new_request_id!r}")
        with self._lock:
            parent = self._seq_of(handle, "fork")
            self._require_resident(parent, "fork")
            if new_request_id in self._seqs:
                raise DuplicateRequestError(f"request id {new_request_id!r} already has a "
                                            "live cache")
            co = self._co
            t = co.tables
            row = t.take_row()
            t.copy_row(parent.row, row)
            for g in co.groups:
                g.pool.acquire(g.table.held(row))
            t.version[parent.row] += 1  # its reserved slots now point at shared blocks
            co.counters.allocations += 1
            co.epoch += 1
            child = SequenceRecord(new_request_id, row, t, self._grow, co.primary.layout.index)
            self._seqs[new_request_id] = child
            self._after_change()
            return self._handle(child)

    def deallocate(self, handle: Handle) -> None:
        """End a request: every handle to it becomes invalid; its blocks return to the
        pool once no other table holds them (prefix-cached ones stay reusable until
        evicted)."""
        with self._lock:
            self._check_open("deallocate")
            if isinstance(handle, str) and handle not in self._seqs:
                raise UnknownRequestError(f"deallocate: no live cache has request id "
                                          f"{handle!r} (already deallocated?)")
            seq = self._seq_of(handle, "deallocate")
            co = self._co
            t = co.tables
            for g in co.groups:
                blocks = g.table.held(seq.row).copy()
                if t.swapped[seq.row]:
                    co.swap.free(g.layout.index, blocks)  # type: ignore[union-attr]
                else:
                    g.release(blocks, by=seq.row)
            del self._seqs[seq.request_id]
            seq.valid = False
            t.release_row(seq.row)
            co.epoch += 1
            self._after_change()

    # --- extend, truncate -------------------------------------------------------------

    def extend(self, handle: Handle, num_tokens: int, *,
               token_ids: Sequence[int] | None = None) -> SlotMapping:
        """Reserve room for ``num_tokens`` more tokens; returns their slots.

        Pass ``token_ids`` to keep prefix-caching the blocks they fill.  A shared last
        block is copied first (copy-on-write).  All or nothing: on
        :class:`~kvcore.errors.OutOfBlocksError` nothing changed.
        """
        return self.extend_batch([handle], num_tokens,
                                 token_ids=None if token_ids is None else [token_ids])

    def extend_batch(self, handles: Sequence[Handle], num_tokens: int = 1, *,
                     token_ids: Sequence[Sequence[int]] | None = None) -> SlotMapping:
        """:meth:`extend` for many sequences at once (one decode step of a batch).

        One :class:`SlotMapping` covers them all, sequences in the order given; the
        whole step is a fixed number of array operations and, when blocks are
        shared, one backend copy per layer, however many sequences it spans.
        """
        n = num_tokens if type(num_tokens) is int and num_tokens > 0 else \
            _positive("num_tokens", num_tokens)
        with self._lock:
            self._check_open("extend")
            co = self._co
            last = self._last_batch
            # A decode loop passes the same handles step after step: while nothing
            # moved (same epoch), they are still live, resident and distinct, and no
            # block they hold became shared, so the checks of the last step hold.
            steady = (last is not None and last[0] == co.epoch
                      and isinstance(handles, (list, tuple)) and len(last[1]) == len(handles)
                      and all(map(operator.is_, handles, last[1])))
            if steady:
                rows, request_ids = last[2], last[3]  # type: ignore[index]
            else:
                seqs = self._batch(handles, "extend")
                rows = np.fromiter((s.row for s in seqs), dtype=np.int64, count=len(seqs))
                request_ids = tuple([s.request_id for s in seqs])
            if n > self._config.max_tokens:
                # No sequence can ever hold it; and lengths are int64, so checking room
                # for it would wrap around instead of refusing.
                co.counters.failures += 1
                raise OutOfBlocksError(f"extending {rows.size} sequence(s) by {n} tokens can "
                                       f"never fit: the pool holds {self._config.max_tokens} "
                                       "tokens in all")
            group_slots, starts = extend_rows(co, rows, n, token_ids, steady=steady)
            first = next((s for s in group_slots if s is not None), _NO_SLOTS)
            mapping = SlotMapping(slots=first, rows=rows, starts=starts, ends=starts + n,
                                  versions=co.tables.version[rows], request_ids=request_ids,
                                  owner=self._token, group_slots=tuple(group_slots))
            if not steady or last[0] != co.epoch:  # type: ignore[index]
                self._last_batch = (co.epoch, tuple(handles), rows, request_ids)
            self._fast = prepare_fast_path(co, mapping, self._fast, checked=steady) \
                if rows.size else None
            self._after_change()
            return mapping

    def truncate(self, handle: Handle, num_tokens: int) -> None:
        """Shorten a sequence to its first ``num_tokens`` tokens (speculative decoding
        rolling back rejected draft tokens; transformers' ``Cache.crop``).

        Blocks past the new end go back to the pool.  If the new last block is partly
        used and shared with another sequence or held by the prefix cache, the sequence
        gets its own copy first, so the tokens it writes next never change anyone
        else's data.  All or nothing.
        """
        with self._lock:
            seq = self._seq_of(handle, "truncate")
            self._require_resident(seq, "truncate")
            if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, np.integer)):
                raise TypeError(f"num_tokens must be an int, got {num_tokens!r}")
            truncate_row(self._co, seq.row, seq.request_id, int(num_tokens))
            self._after_change()

    # --- writes and reads -------------------------------------------------------------

    def write(self, handle: Handle, layer: int, key: Any, value: Any, *,
              start: int | None = None) -> None:
        """Write K/V of ``n = key.shape[0]`` tokens of one sequence into ``layer``.

        They land at positions ``[start, start + n)``; by default the last ``n``
        positions (what the last ``extend`` reserved).  ``key`` and ``value`` are
        ``[n, heads, dim]`` arrays of the cache's dtype and device, in the backend's
        library or any library speaking DLPack (a latent layer takes its vectors as
        ``key`` and ``value=None``; a cross-attention layer takes the encoder's tokens,
        at positions below the encoder length reserved at allocation).  Blocks shared
        with other sequences, or served by the prefix cache, are copied first.
        """
        with self._lock:
            seq = self._seq_of(handle, "write")
            self._require_resident(seq, "write")
            layer = self._check_layer(layer)
            co = self._co
            g = co.groups[co.layer_group[layer]]
            planes, n = g.store.native_kv(key, value, None)
            t = co.tables
            length = int(t.length[seq.row] if g.token_based else t.encoder[seq.row])
            if start is None:
                start = length - n
            if isinstance(start, bool) or not isinstance(start, (int, np.integer)):
                raise TypeError(f"start must be an int, got {start!r}")
            if start < 0 or start + n > length:
                what = "sequence" if g.token_based else "encoder part (cross-attention)"
                raise CapacityError(f"writing {n} tokens at position {start} overruns the "
                                    f"{what} of {length} tokens; extend it first"
                                    if g.token_based else
                                    f"writing {n} tokens at position {start} overruns the "
                                    f"{what} of {length} tokens reserved at allocation")
            write_range(co, seq.row, seq.request_id, layer, planes, n, int(start), self._fast)

    def write_slots(self, layer: int, slots: SlotMapping, key: Any, value: Any) -> None:
        """Write K/V for every token of a :class:`SlotMapping` into ``layer``: one
        backend call however many sequences the mapping spans (vLLM's
        ``reshape_and_cache``).  ``key``/``value`` are ``[slots.num_tokens, heads, dim]``.
        A mapping made by another manager, or stale, is refused with
        :class:`~kvcore.errors.StaleSlotMappingError` before anything is written."""
        with self._lock:
            co = self._co
            if write_fast(co, self._fast, slots, layer, key, value):
                return
            if not isinstance(slots, SlotMapping):
                raise TypeError(f"slots must be a SlotMapping from extend/extend_batch, got "
                                f"{type(slots).__name__}")
            self._check_open("write_slots")
            if slots.owner is not self._token:
                raise StaleSlotMappingError(f"the slot mapping of request(s) "
                                            f"{list(slots.request_ids)} was made by a "
                                            "different manager; this manager refuses it")
            layer = self._check_layer(layer)
            g = co.groups[co.layer_group[layer]]
            planes, _ = g.store.native_kv(key, value, slots.num_tokens)
            write_mapping(co, slots, layer, planes, self._fast)

    def read_batch(self, handles: Sequence[Handle], layer: int, *,
                   layout: BatchLayout = "NHD") -> BatchKv:
        """One layer's K and V for a whole batch, as attention takes them: one gather
        per plane, whole blocks at a time, zero-padded to the longest sequence.

        ``layout="NHD"`` gives ``[batch, tokens, kv_heads, dim]``, ``"HND"`` gives
        ``[batch, kv_heads, tokens, dim]`` (transformers).  The result's ``lengths``
        and ``starts`` say which positions each row holds (see :class:`BatchKv`)."""
        layout = check_layout(layout)
        with self._lock:
            seqs = self._batch(handles, "read_batch")  # live, resident, distinct
            return read_batch(self._co, seqs, self._check_layer(layer), layout)

    # --- save and load (kvcore._persist) ---------------------------------------------

    def save(self, path: str | os.PathLike[str], handles: Sequence[Handle], *,
             metadata: Mapping[str, str] | None = None) -> None:
        """Write the K/V (every layer) and token ids of ``handles`` to ``path`` as a
        safetensors file whose header fingerprints the layout; never a pickle.

        Every layer must hold every token of each sequence.  ``metadata`` adds your
        own string entries to the header (keys starting ``kvcore.`` are reserved).
        The file is replaced atomically.  Load it with :meth:`load`, inspect it with
        :func:`kvcore.inspect_cache_file`.
        """
        _persist.save(self, path, handles, metadata)

    def load(self, path: str | os.PathLike[str], *, request_ids: Sequence[str] | None = None,
             extra_key: str | None = None) -> list[PagedKvCacheHandle]:
        """Load the sequences :meth:`save` wrote; one handle each, in file order.

        The file's layers, KV heads, head size and dtype must be this manager's
        (:class:`~kvcore.errors.LayoutMismatchError` names both layouts; the block size
        may differ).  Sequences get their saved request ids unless ``request_ids``
        names new ones.  Those with token ids are allocated with them (salted with
        ``extra_key``), so their full blocks join the prefix cache, and blocks it
        already holds for the same tokens are shared instead of written.

        All or nothing: a file that is not a readable kvcore cache
        (:class:`~kvcore.errors.CacheFileError`), a duplicate request id, or a load
        that does not fit (:class:`~kvcore.errors.OutOfBlocksError`) changes nothing.
        """
        return _persist.load(self, path, request_ids, extra_key)

    # --- the store (kvcore._store_link) ------------------------------------------------

    def flush_store(self, timeout: float | None = None) -> bool:
        """Wait until the blocks queued for the store were sent (``True``) or ``timeout``
        seconds passed (``False``); ``True`` at once without a store.  With the store
        option ``strict``, raises the first failed write."""
        with self._lock:
            self._check_open("flush_store")
            link = self._link
        return True if link is None else link.flush(timeout)

    def store_stats(self) -> StoreStats | None:
        """The store connector's own counters (queue, breaker, timeouts...), or ``None``
        without a store.  :meth:`stats` has the store's hits, misses and bytes too."""
        with self._lock:
            self._check_open("store_stats")
            return None if self._link is None else self._link.stats()

    def block_digests(self, handle: Handle) -> list[bytes]:
        """The keyed cryptographic chain keys (16 bytes, BLAKE2b keyed with
        ``config.hash_key``) of the sequence's full blocks whose token ids are known, in
        order: the names its blocks have in a store.  Needs a store or
        ``crypto_block_keys=True``."""
        with self._lock:
            seq = self._seq_of(handle, "block_digests")
            if self._link is None:
                raise UnsupportedError("block_digests: this manager computes no cryptographic "
                                       "block keys; configure a store or "
                                       "crypto_block_keys=True")
            return self._link.digests.of_row(seq.row)

    # --- swap ---------------------------------------------------------------------------

    def swap_out(self, handle: Handle) -> None:
        """Move a sequence's blocks to the swap pool (on ``config.swap_device``) and
        release them here.  Its handles stay valid; data access waits for ``swap_in``.
        All or nothing, over every layer group."""
        with self._lock:
            self._check_open("swap_out")
            require_swap(self._co)
            seq = self._seq_of(handle, "swap_out")
            self._require_resident(seq, "swap_out")
            if not self._co.joined_complete(seq.row):
                raise PendingPrefixError(f"swap_out: request {seq.request_id!r} shares a prefix "
                                         "whose prefill is still being written; swap it out "
                                         "after that prefill")
            swap_out_sequence(self._co, seq.row, seq.request_id)
            self._moved(seq.row)

    def swap_in(self, handle: Handle) -> None:
        """Bring a swapped-out sequence back into the main pool, bit-identical.  All or
        nothing, over every layer group."""
        with self._lock:
            self._check_open("swap_in")
            require_swap(self._co)
            seq = self._seq_of(handle, "swap_in")
            if not self._co.tables.swapped[seq.row]:
                raise CacheError(f"swap_in: request {seq.request_id!r} is not swapped out")
            swap_in_sequence(self._co, seq.row, seq.request_id)
            self._moved(seq.row)

    def _moved(self, row: int) -> None:
        t = self._co.tables
        t.hashing[row] = False  # blocks moved off the prefix cache: stop extending the chain
        t.version[row] += 1
        self._co.epoch += 1
        self._after_change()

    # --- the prefix cache ---------------------------------------------------------------

    def gc(self) -> CacheGcStats:
        """Drop the prefix cache of every block no sequence references, making them
        plain free blocks.  Blocks in use are never touched."""
        with self._lock:
            self._check_open("gc")
            stats = intro.collect_garbage(self._co)
            self._after_change()
            return stats

    def reset_prefix_cache(self) -> int:
        """Forget every prefix-cache entry (after the model's weights change): blocks in
        use stay valid for the sequences holding them but are never served to a new
        request, and free cached blocks become empty.  Returns the entries dropped."""
        with self._lock:
            self._check_open("reset_prefix_cache")
            dropped = intro.reset_prefix_cache(self._co)
            self._after_change()
            return dropped

    # --- introspection ------------------------------------------------------------------

    def _level(self) -> MemoryPressure:
        return intro.pressure_level(self._co)

    def pressure(self) -> MemoryPressure:
        """The memory-pressure level now (fraction of blocks in use)."""
        with self._lock:
            self._check_open("pressure")
            return self._level()

    def _after_change(self) -> None:
        groups = self._co.groups
        used = groups[0].pool.num_used if len(groups) == 1 else \
            sum(g.pool.num_used for g in groups)
        if used == self._used:  # the level depends on the blocks in use only
            return
        self._used = used
        level = self._level()
        if level is self._pressure:
            return
        self._pressure = level
        if self._on_pressure is not None:
            try:
                self._on_pressure(level, intro.manager_stats(self._co, self._seqs))
            except Exception as exc:  # noqa: BLE001 - a callback must not undo our work
                warnings.warn(f"kvcore on_pressure callback {self._on_pressure!r} raised "
                              f"{type(exc).__name__}: {exc}; the cache operation itself "
                              "completed", RuntimeWarning, stacklevel=3)

    def stats(self) -> CacheManagerStats:
        with self._lock:
            self._check_open("stats")
            return intro.manager_stats(self._co, self._seqs)

    def check_invariants(self) -> None:
        """Raise :class:`~kvcore.errors.InvariantError` unless the parts agree: free +
        cached + used == total, every refcount equals the number of tables holding
        the block, no table holds a block twice, lengths fit, the prefix index and the
        free lists agree."""
        with self._lock:
            self._check_open("check_invariants")
            intro.check_invariants(self._co, self._seqs)

    def flashinfer_page_table(self, handles: Sequence[Handle], *,
                              group: int | None = None) -> FlashInferPageTable:
        """The batch's pages as FlashInfer's ``indptr`` / ``indices`` / ``last_page_len``,
        in layer group ``group`` (default: the first full-attention group).  Pages a
        sliding window gave back are ``-1``."""
        with self._lock:
            self._check_open("page table")
            rows = self._dir.rows_of(handles, "page table")
            return intro.flashinfer_table(self._co, rows, self._co.group(group))

    def vllm_block_table(self, handles: Sequence[Handle], *, pad_value: int = 0,
                         group: int | None = None) -> VllmBlockTable:
        """The batch's pages as vLLM's padded ``block_tables`` plus ``seq_lens``, in layer
        group ``group`` (default: the first full-attention group).  Pages a sliding
        window gave back are ``pad_value``, like the padding."""
        if isinstance(pad_value, bool) or not isinstance(pad_value, (int, np.integer)):
            raise TypeError(f"pad_value must be an int, got {pad_value!r}")
        if not -2**31 <= pad_value < 2**31:
            raise ValueError(f"pad_value must fit the int32 table, got {pad_value}")
        with self._lock:
            self._check_open("page table")
            rows = self._dir.rows_of(handles, "page table")
            return intro.vllm_table(self._co, rows, self._co.group(group), pad_value)

    def layer_pool(self, layer: int) -> TensorRef:
        """The current pool of ``layer``: ``[2, num_blocks, block_size, heads, dim]`` (K
        at index 0, V at 1; one plane for a latent layer), for attention kernels.
        With a mutable backend it is shared with the cache; with an immutable one
        (``mutable_pools=False``) it is the pool as of now, and a later call gives the
        pool after later writes.  A layer whose K and V widths differ keeps two pools:
        use :meth:`layer_pools`."""
        with self._lock:
            self._check_open("layer_pool")
            layer = self._check_layer(layer)
            co = self._co
            return co.groups[co.layer_group[layer]].store.layer_pool(co.layer_local[layer])

    def layer_pools(self, layer: int) -> tuple[TensorRef, ...]:
        """Every pool of ``layer`` (one, or K's and V's when their widths differ)."""
        with self._lock:
            self._check_open("layer_pools")
            layer = self._check_layer(layer)
            co = self._co
            return co.groups[co.layer_group[layer]].store.layer_pools(co.layer_local[layer])

    def layer_group(self, layer: int) -> int:
        """The index of the layer group ``layer`` belongs to (``config.groups``)."""
        return self._co.layer_group[self._check_layer(layer)]

    def __repr__(self) -> str:
        c = self._config
        state = "closed" if self._closed else f"live={len(self._seqs)}"
        return (f"KvCacheManager(backend={self._backend.name!r}, layers={c.num_layers}, "
                f"kv_heads={c.num_kv_heads}, head_dim={c.head_dim}, dtype={c.dtype.value}, "
                f"blocks={c.num_blocks}x{c.block_size}, device={c.device}, {state})")


_NO_SLOTS = np.zeros(0, dtype=np.int64)


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)
