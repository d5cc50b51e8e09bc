"""Saving a manager's sequences to a cache file and loading them into a manager.

The file format is :mod:`kvcore._cache_file`.  Saving reads every layer's K/V through
the public reads, as raw bits (bfloat16 from the exact float32 widening
``Backend.to_numpy`` gives); loading puts them back through ``Backend.from_bits``, so
a round trip is bit-identical, NaN payloads included.

Loading is all or nothing: the file is read and checked whole (header, format version,
names, dtypes and shapes, token ids) and its layout compared with the manager's before
the manager is touched; the blocks the load needs are counted first (prefix hits
included) and a load that would not fit is refused unchanged; sequences are then
allocated with their token ids and ``allow_full_hit``, so their full blocks are
registered in the prefix cache (and blocks the cache already holds are shared, not
written again), and any failure deallocates what the load allocated.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ._backend import BITS_DTYPES, Backend
from ._cache_file import (DTYPE_CODES, CacheLayout, Payload, SavedFile, format_metadata, read_file,
                          user_metadata, write_file)
from ._device import DType
from ._growth import plan_allocation
from .errors import (CacheError, DuplicateRequestError, LayoutMismatchError, OutOfBlocksError,
                     UnsupportedError)
from .models import AllocationRequest, CacheConfig

if TYPE_CHECKING:
    import threading

    from ._coordinator import Coordinator
    from ._paged_handle import PagedKvCacheHandle
    from ._sequence_table import SequenceRecord


class KvCacheManager(Protocol):
    """What saving and loading use of a :class:`kvcore.KvCacheManager` (named here, not
    imported: the manager imports this module)."""

    _lock: threading.RLock
    _co: Coordinator
    config: CacheConfig
    backend: Backend

    def _check_open(self, op: str) -> None: ...

    def _batch(self, handles: Any, op: str) -> list[SequenceRecord]: ...

    def _handle(self, seq: SequenceRecord) -> PagedKvCacheHandle: ...

    def allocate(self, request: AllocationRequest) -> PagedKvCacheHandle: ...

    def write(self, handle: Any, layer: int, key: Any, value: Any, *,
              start: int | None = None) -> None: ...

    def deallocate(self, handle: Any) -> None: ...

__all__ = ["collect", "host_bits", "load", "load_into", "load_saved", "save"]


# --- saving --------------------------------------------------------------------------


def save(manager: KvCacheManager, path: str | os.PathLike[str], handles: Sequence[Any],
         metadata: Mapping[str, str] | None, *, reserved_ok: bool = False) -> None:
    """:meth:`KvCacheManager.save` (``reserved_ok``: kvcore's own integrations may add
    ``kvcore.*`` metadata)."""
    check_single_group(manager.config, "save")
    with manager._lock:
        seqs = manager._batch(handles, "save")
        payload = collect(manager, [manager._handle(s) for s in seqs], metadata,
                          reserved_ok=reserved_ok)
    write_file(path, payload)  # outside the lock: the data is read already


def host_bits(backend: Backend, native: Any, dtype: DType) -> np.ndarray:
    """The raw bits of a backend array, on the host (``uint16`` / ``uint32``)."""
    host = backend.to_numpy(native)
    want = np.dtype(np.float16 if dtype is DType.float16 else np.float32)
    if not isinstance(host, np.ndarray) or host.dtype != want:
        raise CacheError(f"backend {backend.name!r}: to_numpy of a {dtype.value} array gave "
                         f"{getattr(host, 'dtype', type(host).__name__)}, expected {want}")
    if dtype is not DType.bfloat16:
        return host.view(BITS_DTYPES[dtype])
    wide = host.view(np.uint32)
    if np.any(wide & np.uint32(0xFFFF)):
        raise CacheError(f"backend {backend.name!r}: to_numpy of a bfloat16 array is not "
                         "the exact float32 widening (low 16 bits set)")
    return (wide >> np.uint32(16)).astype(np.uint16)


def collect(manager: KvCacheManager, handles: Sequence[PagedKvCacheHandle],
            metadata: Mapping[str, str] | None, *, reserved_ok: bool = False) -> Payload:
    """Read what :func:`write_file` will write: every layer's K/V of each sequence,
    through the public reads.  Every layer must hold every token."""
    user = user_metadata(metadata, reserved_ok=reserved_ok)
    cfg, backend = manager.config, manager.backend
    layers, heads, dim, dtype = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.dtype
    code, bits = DTYPE_CODES[dtype], BITS_DTYPES[dtype]
    sequences, tensors = [], []
    for handle in handles:  # check them all before reading any
        n = handle.num_tokens()
        short = [layer for layer in range(layers) if handle.num_written(layer) != n]
        if short:
            raise CacheError(f"save: request {handle.request_id!r} holds {n} tokens but layer "
                             f"{short[0]} has K/V for {handle.num_written(short[0])} of "
                             "them; write every layer of every token before saving")
    for i, handle in enumerate(handles):
        n = handle.num_tokens()
        ids = handle.token_ids()
        key = np.empty((layers, n, heads, dim), dtype=bits)
        value = np.empty_like(key)
        for layer in range(layers if n else 0):
            k, v = handle.kv_cache(layer)  # type: ignore[misc]
            key[layer] = host_bits(backend, k.native, dtype)
            value[layer] = host_bits(backend, v.native, dtype)
        sequences.append({"request_id": handle.request_id, "num_tokens": n,
                          "token_ids": ids is not None})
        tensors += [(f"seq.{i}.key", code, key), (f"seq.{i}.value", code, value)]
        if ids is not None:
            tensors.append((f"seq.{i}.token_ids", "I64", np.asarray(ids, dtype=np.int64)))
    return Payload({**format_metadata(cfg, sequences), **user}, tensors)


# --- loading -------------------------------------------------------------------------


def load(manager: KvCacheManager, path: str | os.PathLike[str],
         request_ids: Sequence[str] | None, extra_key: str | None) -> list[PagedKvCacheHandle]:
    """:meth:`KvCacheManager.load`."""
    return load_saved(manager, read_file(path), request_ids, extra_key)


def load_saved(manager: KvCacheManager, saved: SavedFile, request_ids: Sequence[str] | None,
               extra_key: str | None) -> list[PagedKvCacheHandle]:
    """Load a file :func:`read_file` read and checked, under the manager's lock."""
    with manager._lock:
        manager._check_open("load")
        return load_into(manager, saved, request_ids, extra_key)


def check_single_group(config: CacheConfig, op: str) -> None:
    """Cache files hold one float layout for every layer: refuse a manager of layer
    groups, or of a quantized codec (a file holds K/V bits; a codec's codes and scales
    would have to round-trip through its decoded values)."""
    if config.dtype.is_codec:
        raise UnsupportedError(f"{op}: cache files hold float16, bfloat16 or float32 K/V; "
                               f"this manager's dtype is the {config.dtype.value} codec")
    if config.layer_groups:
        raise UnsupportedError(f"{op}: cache files hold caches whose layers share one "
                               "layout; this manager has layer_groups (sliding, latent or "
                               "cross-attention layers, or several head shapes)")


def check_layout(config: CacheConfig, saved: SavedFile) -> None:
    """Refuse a file whose K/V have another shape than the manager's."""
    check_single_group(config, "load")
    mine, theirs = CacheLayout.of(config), saved.info.layout
    differ = mine.differences(theirs)
    if differ:
        raise LayoutMismatchError(
            f"{saved.where} holds K/V of layout ({theirs}); this manager's is ({mine}): "
            f"{', '.join(differ)} differ.  Load it into a manager of the file's layout "
            "(kvcore.inspect_cache_file tells it)")


def _requests(manager: KvCacheManager, saved: SavedFile, request_ids: Sequence[str] | None,
              extra_key: str | None) -> list[AllocationRequest]:
    seqs = saved.info.sequences
    if request_ids is None:
        ids = [s.request_id for s in seqs]
    else:
        if isinstance(request_ids, (str, bytes)) or not isinstance(request_ids, Sequence):
            raise TypeError(f"request_ids must be a list of str, got "
                            f"{type(request_ids).__name__}")
        ids = list(request_ids)
        if len(ids) != len(seqs):
            raise ValueError(f"request_ids has {len(ids)} ids for the {len(seqs)} sequences "
                             f"of {saved.where}")
        bad = [r for r in ids if not isinstance(r, str) or not r]
        if bad:
            raise ValueError(f"request ids must be non-empty strings, got {bad[0]!r}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"request_ids names a request twice: {ids}")
    if extra_key is not None and not isinstance(extra_key, str):
        raise TypeError(f"extra_key must be a str or None, got {type(extra_key).__name__}")
    live = [r for r in ids if r in manager]
    if live:
        raise DuplicateRequestError(f"request id {live[0]!r} already has a live cache; load "
                                    f"{saved.where} with request_ids=[...] naming new ids")
    out = []
    for rid, seq, tokens in zip(ids, seqs, saved.token_ids):
        if tokens is None or seq.num_tokens == 0:
            out.append(AllocationRequest(request_id=rid, num_tokens=seq.num_tokens))
        else:  # registers its full blocks, and takes those already cached
            out.append(AllocationRequest(request_id=rid, prompt_token_ids=tokens,
                                         extra_key=extra_key, allow_full_hit=True))
    return out


def _preflight(manager: KvCacheManager, requests: list[AllocationRequest], where: str) -> None:
    """Refuse, changing nothing, a load whose blocks do not fit.  A sequence takes from
    the prefix cache what the cache holds now or what an earlier sequence of the file
    fills (prefix chains are prefix-closed, so the longer run of the two is served);
    cached blocks it takes back are free blocks no one else gets.  Exact: should new
    blocks evict a cached block a later sequence counted on, the evicted block was one
    of the free blocks counted, and the later sequence takes one new block instead."""
    co = manager._co
    bs = co.block_size
    group = co.groups[0]  # check_layout refused caches of several layer groups
    seen: set[int] = set()  # chain keys of the full blocks the file's sequences fill
    taken_back: set[int] = set()
    need = served = 0
    for request in requests:
        n = request.num_tokens or 0
        total = -(-n // bs)
        if request.prompt_token_ids is None:
            need += total
            continue
        plan = plan_allocation(co, request)
        hits = plan.groups[0].acquire
        taken_back.update(hits[group.pool.ref[hits] == 0].tolist())
        ours = 0
        if plan.keys is not None and plan.keys.size:
            keys = plan.keys.tolist()
            present = np.fromiter((k in seen for k in keys), dtype=bool, count=len(keys))
            ours = len(keys) if present.all() else int(np.argmin(present))
            seen.update(keys)
        hit = max(hits.size, ours)
        need += total - hit
        served += hit
    free = group.pool.num_free - len(taken_back)
    if need > free:
        raise OutOfBlocksError(f"loading {where} needs {need} new blocks ({len(requests)} "
                               f"sequences, {served} blocks served from the prefix cache) but "
                               f"only {free} are free; nothing was loaded")


def load_into(manager: KvCacheManager, saved: SavedFile, request_ids: Sequence[str] | None,
              extra_key: str | None) -> list[PagedKvCacheHandle]:
    """Allocate and write every sequence of ``saved``, all or nothing (the caller holds
    the manager's lock)."""
    cfg, backend = manager.config, manager.backend
    check_layout(cfg, saved)
    requests = _requests(manager, saved, request_ids, extra_key)
    _preflight(manager, requests, saved.where)
    handles: list[PagedKvCacheHandle] = []
    try:
        for i, request in enumerate(requests):
            handle = manager.allocate(request)
            handles.append(handle)
            n, done = request.num_tokens or 0, handle.num_cached_tokens()
            if done >= n:
                continue  # served whole by the prefix cache
            # One host-to-device copy per plane; the layers are views of it.
            key = backend.from_bits(saved.keys[i][:, done:], cfg.dtype, cfg.device)
            value = backend.from_bits(saved.values[i][:, done:], cfg.dtype, cfg.device)
            for layer in range(cfg.num_layers):
                manager.write(handle, layer, key[layer], value[layer], start=done)
    except BaseException:
        # The count above is exact (a cached block evicted by an earlier sequence's
        # new blocks was itself one of the free blocks counted), so this is for a
        # backend that fails (device memory, a broken from_bits): give back
        # everything this load took.
        for handle in handles:
            manager.deallocate(handle)
        raise
    return handles
