"""KvCacheManager: the backend-neutral paged KV cache.

The manager owns one block pool per device (the main pool, and optionally a swap
pool), the block tables of every live sequence, the prefix cache and the statistics.
Backends only move array data, in bulk (see :mod:`kvcore._backend`).

This module holds the state, allocation (with prefix caching), fork and deallocate.
The rest of the class lives beside it, one concern per module: extend and truncate
(``_extension``), writes and reads (``_kv_io``), swap (``_swap``), and statistics,
gc, invariants and page tables (``_introspection``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from ._backend import Backend
from ._block_pool import BlockPool
from ._extension import ExtendMixin
from ._introspection import IntrospectionMixin
from ._kv_io import KvIOMixin
from ._paged_handle import PagedKvCacheHandle
from ._prefix_cache import ChainHasher, PrefixPlan, plan_prefix
from ._registry import get_backend
from ._sequence import _Sequence
from ._slot_mapping import SlotMapping
from ._swap import SwapMixin
from .errors import (DuplicateRequestError, HandleSwappedError, InvalidHandleError,
                     LayerIndexError, OutOfBlocksError, UnknownRequestError, UnsupportedError)
from .models import AllocationRequest, CacheConfig, CacheManagerStats, MemoryPressure

__all__ = ["KvCacheManager"]

PressureCallback = Callable[[MemoryPressure, CacheManagerStats], None]


class KvCacheManager(ExtendMixin, KvIOMixin, SwapMixin, IntrospectionMixin):
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

    def _room(self, plan: PrefixPlan) -> tuple[int, int]:
        """New blocks ``plan`` needs, and blocks free for them (a free cached block the
        plan hits is taken back, not allocated, so it does not count as free)."""
        return (plan.total_blocks - len(plan.hits),
                self._pool.num_free - self._pool.count_free(plan.hits))

    def can_allocate(self, request: AllocationRequest) -> bool:
        """Whether :meth:`allocate` would succeed now (prefix hits counted).  Changes
        nothing, not even the statistics."""
        if not isinstance(request, AllocationRequest):
            raise TypeError(f"expected an AllocationRequest, got {type(request).__name__}")
        with self._lock:
            if request.request_id in self._seqs:
                return False
            need, free = self._room(self._prefix_plan(request))
            return need <= free

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
            plan = self._prefix_plan(request)
            _, hits, keys, rows = plan
            need, free = self._room(plan)
            if need > free:
                self._failures += 1
                raise OutOfBlocksError(
                    f"request {rid!r} needs {need} new blocks ({request.num_tokens} tokens, "
                    f"{len(hits)} blocks from the prefix cache) but only {free} are free")
            pool = self._pool
            pool.acquire(hits)
            blocks = hits + self._take(need)
            bs = self._config.block_size
            if rows is not None:
                pool.register_run(blocks, keys, rows, len(hits))
                self._queries += len(keys)
                self._hits += len(hits)
            self._allocations += 1
            row = self._take_row()
            seq = _Sequence(rid, row, bs, blocks, request.num_tokens or 0, self._grow)
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

    def _grow(self, seq: _Sequence, num_tokens: int) -> None:
        """What a managed block table's ``extend_sequence`` does."""
        self.extend(self._handle(seq), num_tokens)

    def _copy_blocks(self, src: list[int], dst: list[int]) -> None:
        be, device = self._backend, self._config.device
        src_i = be.index_array(np.asarray(src, dtype=np.int64), device)
        dst_i = be.index_array(np.asarray(dst, dtype=np.int64), device)
        self._layers = be.copy_blocks_layers(self._layers, src_i, dst_i)
        self._filled[dst] = self._filled[src]
        self._complete[dst] = self._complete[src]
        self._cow += len(src)

    # --- fork, deallocate -----------------------------------------------------------------

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
            child = _Sequence(new_request_id, row, self._config.block_size, blocks,
                              parent.table._length, self._grow)
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
