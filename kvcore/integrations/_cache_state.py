"""A :class:`~kvcore.integrations.transformers.KvCoreCache`'s state, copied and kept:
forks (``fork``, ``copy.copy``, ``copy.deepcopy``) and files (``save``, ``load``).

A fork shares the manager and, until written, every block; every other piece of
Python state is its own.  :data:`SHARED_ON_FORK` and :data:`REMADE_ON_FORK` say, for
each attribute of the cache, which it is; an attribute in neither (a subclass's) is
copied as ``copy.copy`` / ``copy.deepcopy`` would, and the project's tests fail when
the cache gains an attribute that is in neither, so each new piece of state gets a
decision.

A cache owns its rows.  transformers' recipe drops each copy after its ``generate``
call without releasing it, so a fork is *watched*: when Python collects it, its
request-id prefix is queued (a finalizer may run inside any allocation, even inside
the manager, so it only appends to a queue), and the next fork, save or load on the
same manager deallocates the queued caches' sequences.  ``release()`` (or a ``with``
block) gives them back at once.

A saved cache is a :meth:`KvCacheManager.save` file (one sequence per row, in row
order) whose metadata also holds the batch layout under ``kvcore.transformers``
(JSON): the rectangle's width, each row's left padding and prompt tokens served from
the prefix cache, the prompts given to ``set_prompts`` and the ``extra_key``.
"""

from __future__ import annotations

import copy
import itertools
import os
import uuid
import weakref
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import ValidationError

from .. import _cache_file, _persist
from ..errors import CacheFileError
from ..models import NonNegativeInt, _Record

if TYPE_CHECKING:
    from .._manager import KvCacheManager
    from .._paged_handle import PagedKvCacheHandle

#: A :class:`~kvcore.integrations.transformers.KvCoreCache`: named, not imported, since
#: the cache's module imports this one (its private state is what this module copies).
KvCoreCache = Any

__all__ = ["REMADE_ON_FORK", "SAVED", "SHARED_ON_FORK", "fork_cache", "load_cache",
           "reap", "save_cache", "watch"]

#: Attributes a fork shares with its original: the manager and immutable values
#: (``_is_user_defined`` is the flag transformers' ``generate`` sets on a cache it got).
SHARED_ON_FORK = frozenset({"_manager", "_extra_key", "_prompt_width", "_length",
                            "layer_class_to_replicate", "offloading", "_is_user_defined",
                            # the layout read from the manager, and views of its pools
                            "_specs", "_cross_group", "_windows", "_pool_views",
                            # plain values of the pass and the rows
                            "_mode", "_repeat", "_fresh",
                            "_encoder_tokens"})
#: Attributes a fork makes anew: its own rows (forked sequences), ids, layers and arrays.
REMADE_ON_FORK = frozenset({"_prefix", "_ids", "layers", "_prompts", "_layer_len", "_pads",
                            "_cached", "_mapping", "_reads", "_index", "_handles", "_waiting",
                            "_next_ids", "_paired",
                            "_held_back", "_cross_done"})

#: ``KvCoreCache.load(..., extra_key=SAVED)``: the saved cache's ``extra_key``.
SAVED: Any = type("SavedExtraKey", (), {"__repr__": lambda self: "<the saved extra_key>"})()
_META_KEY = "kvcore.transformers"


# --- caches dropped without release ---------------------------------------------------

#: Per manager: request-id prefixes of watched caches Python has collected.
_ORPHANS: weakref.WeakKeyDictionary[Any, deque[str]] = weakref.WeakKeyDictionary()
_WATCHED: weakref.WeakSet[Any] = weakref.WeakSet()


def watch(cache: KvCoreCache) -> None:
    """Queue ``cache``'s rows for deallocation when Python collects it."""
    if cache in _WATCHED:
        return
    queue = _ORPHANS.setdefault(cache._manager, deque())
    # The callback holds the queue and the prefix, never the cache; deque.append is
    # atomic, so it is safe wherever the collector runs it.
    weakref.finalize(cache, queue.append, f"{cache._prefix}-").atexit = False
    _WATCHED.add(cache)


def reap(manager: KvCacheManager) -> int:
    """Deallocate the sequences of watched caches that were collected; returns how
    many.  Called at safe points (fork, save, load), never from a finalizer."""
    queue = _ORPHANS.get(manager)
    if not queue or manager.closed:
        return 0
    prefixes = []
    while queue:
        try:
            prefixes.append(queue.popleft())
        except IndexError:  # drained by another thread meanwhile
            break
    gone = tuple(prefixes)
    count = 0
    with manager._lock:
        for handle in manager.list_handles():
            if handle.request_id.startswith(gone):
                manager.deallocate(handle)
                count += 1
    return count


# --- forks -----------------------------------------------------------------------------


def fork_cache(cache: KvCoreCache, memo: dict[int, Any] | None) -> KvCoreCache:
    """A copy of ``cache`` whose rows are copy-on-write forks of its sequences; ``memo``
    is ``copy.deepcopy``'s (``None`` for ``fork()`` and ``copy.copy``)."""
    cache._check_between_steps("fork")
    reap(cache._manager)
    new = object.__new__(type(cache))
    if memo is not None:
        memo[id(cache)] = new
    for name, value in cache.__dict__.items():
        if name not in SHARED_ON_FORK and name not in REMADE_ON_FORK:
            value = copy.deepcopy(value, memo) if memo is not None else copy.copy(value)
        new.__dict__[name] = value
    new._prefix = f"hf-{uuid.uuid4().hex[:12]}"  # request ids unique in the shared manager
    new._ids = itertools.count()
    new.layers = [_layer_for(layer, new) for layer in cache.layers]
    new._prompts = None if cache._prompts is None else list(cache._prompts)
    new._layer_len = list(cache._layer_len)
    new._pads = cache._pads.copy()
    new._cached = cache._cached.copy()
    new._mapping = None  # made by the next step's extend, for the copy's own rows
    new._reads = {}      # indices of the copy's own rows, made on its next read
    new._index = {}
    new._next_ids = None
    new._paired = False  # KvCoreEncoderDecoderCache.fork pairs the copy again
    new._waiting = None if cache._waiting is None else \
        (list(cache._waiting[0]), cache._waiting[1].copy())
    new._held_back = list(cache._held_back)
    new._cross_done = list(cache._cross_done)
    manager = cache._manager
    handles: list[PagedKvCacheHandle] = []
    try:
        for handle in cache._handles:
            handles.append(manager.fork(handle, new._new_id()))
    except BaseException:
        for handle in handles:  # all or nothing
            manager.deallocate(handle)
        raise
    new._handles = handles
    watch(new)
    return new


def _layer_for(layer: Any, owner: KvCoreCache) -> Any:
    """``layer``'s state (initialised, device) as a layer of ``owner``."""
    moved = object.__new__(type(layer))
    moved.__dict__.update(layer.__dict__)
    moved._owner = owner
    return moved


# --- files -----------------------------------------------------------------------------


class _Batch(_Record):
    """The batch layout saved next to the rows (``kvcore.transformers``)."""

    version: Literal[1] = 1
    length: NonNegativeInt
    pads: list[NonNegativeInt]
    cached: list[NonNegativeInt]
    prompts: list[list[NonNegativeInt]] | None
    prompt_width: NonNegativeInt
    extra_key: str | None


def save_cache(cache: KvCoreCache, path: str | os.PathLike[str],
               metadata: Mapping[str, str] | None) -> None:
    cache._check_between_steps("save")
    reap(cache._manager)
    batch = _Batch(length=cache._length, pads=cache._pads.tolist(),
                   cached=cache._cached.tolist(),
                   prompts=None if cache._prompts is None else [list(p) for p in cache._prompts],
                   prompt_width=cache._prompt_width, extra_key=cache._extra_key)
    user = _cache_file.user_metadata(metadata, reserved_ok=False)
    _persist.save(cache._manager, path, cache._handles,
                  {**user, _META_KEY: batch.model_dump_json()}, reserved_ok=True)


def _batch_of(saved: _cache_file.SavedFile) -> _Batch:
    """The saved batch layout, checked against the rows the file holds."""
    text = saved.info.metadata.get(_META_KEY)
    if text is None:
        raise CacheFileError(f"{saved.where} was saved by KvCacheManager.save, not by "
                             "KvCoreCache.save: it has no batch layout "
                             f"({_META_KEY!r}); load it with manager.load")
    try:
        batch = _Batch.model_validate_json(text)
    except ValidationError as exc:
        raise CacheFileError(f"{saved.where}: its {_META_KEY!r} entry is malformed: "
                             f"{exc}") from None
    lengths = [s.num_tokens for s in saved.info.sequences]
    rows = len(lengths)
    if len(batch.pads) != rows or len(batch.cached) != rows:
        raise CacheFileError(f"{saved.where}: the batch layout names {len(batch.pads)} rows "
                             f"of padding and {len(batch.cached)} cached counts for {rows} "
                             "saved rows")
    want = [batch.length - p for p in batch.pads]
    if lengths != want:
        raise CacheFileError(f"{saved.where}: rows hold {lengths} tokens, but a width of "
                             f"{batch.length} with padding {batch.pads} means {want}")
    if batch.prompts is not None and rows and (not batch.prompts or rows % len(batch.prompts)):
        raise CacheFileError(f"{saved.where}: {rows} rows cannot come from "
                             f"{len(batch.prompts)} prompts")
    return batch


def load_cache(cls: type[KvCoreCache], path: str | os.PathLike[str],
               manager: KvCacheManager, extra_key: Any) -> KvCoreCache:
    saved = _cache_file.read_file(path)
    batch = _batch_of(saved)  # everything checked before the manager is touched
    key = batch.extra_key if extra_key is SAVED else extra_key
    reap(manager)
    cache = cls(manager, extra_key=key)
    ids = [cache._new_id() for _ in saved.info.sequences]
    handles = _persist.load_saved(manager, saved, ids, key)
    cache._handles = handles
    cache._pads = np.asarray(batch.pads, dtype=np.int64)
    cache._cached = np.asarray(batch.cached, dtype=np.int64)
    cache._length = batch.length
    cache._layer_len = [batch.length] * len(cache._specs)
    cache._prompts = None if batch.prompts is None else [tuple(p) for p in batch.prompts]
    cache._prompt_width = batch.prompt_width
    if handles:  # what the first update would have set: the layers hold K/V
        device = torch.device(str(manager.config.device))
        for layer in cache.layers:
            layer.device = device
            layer.is_initialized = True
    watch(cache)
    return cache

