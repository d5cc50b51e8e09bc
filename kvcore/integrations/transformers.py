"""A Hugging Face transformers ``Cache`` whose K/V live in a kvcore manager.

::

    from kvcore.integrations.transformers import KvCoreCache

    cache = KvCoreCache.from_model(model, backend="torch", num_blocks=512)
    cache.set_prompts(inputs["input_ids"], inputs["attention_mask"])  # prefix caching
    out = model.generate(**inputs, cache=cache, max_new_tokens=32)
    print(cache.manager.stats())
    cache.release()

Written against the ``Cache`` / ``CacheLayerMixin`` API of transformers 5.x (tested with
5.24): ``generate`` passes the cache as ``cache=`` (``past_key_values=`` is the
deprecated spelling), every attention layer calls ``cache.update(key, value,
layer_idx)`` with ``[batch, kv_heads, new_tokens, head_dim]`` tensors and attends over
what it returns, beam search calls ``reorder_cache(beam_idx)``.

How the batch maps onto kvcore:

* each batch row is one kvcore sequence; ``update`` writes the new tokens through the
  manager (a decode step is one ``extend_batch`` and one ``write_slots`` per layer)
  and returns the whole rectangle gathered from the pool through the page table;
* with :meth:`KvCoreCache.set_prompts`, left padding is stripped: a row stores only
  its real tokens, allocated with their ids so full prompt blocks are shared through
  the prefix cache (with earlier ``generate`` calls on the same manager, and with
  earlier rows of the same batch, whose prefill is joined while it runs:
  ``AllocationRequest(join_pending=True)``), and prefill writes only the tokens the
  cache did not already hold; without it every position, padding included, is
  stored, as ``DynamicCache`` does;
* ``reorder_cache`` (beam search), ``batch_select_indices`` and
  ``batch_repeat_interleave`` map to :meth:`~kvcore.KvCacheManager.fork` and
  :meth:`~kvcore.KvCacheManager.deallocate`: a beam that survives twice is forked, and
  copy-on-write gives each child its own copy of the shared last block when it writes.

* ``crop(-n)`` (assisted and speculative decoding roll back rejected draft tokens)
  maps to :meth:`~kvcore.KvCacheManager.truncate`, which copies a shared or
  prefix-cached last block before the row writes into it again; assisted decoding
  (``generate(..., assistant_model=...)``) gives ``DynamicCache``'s exact tokens on a
  cache without :meth:`KvCoreCache.set_prompts`.

* ``copy.deepcopy`` / ``copy.copy`` / :meth:`KvCoreCache.fork` fork every row on the
  same manager (transformers' prompt-reuse recipe; no K/V copied until written), and
  :meth:`KvCoreCache.save` / :meth:`KvCoreCache.load` keep a cache in a safetensors
  file (:mod:`kvcore.integrations._cache_state`).

Not supported: sliding-window and linear-attention layers.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np

try:
    import torch
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("kvcore.integrations.transformers needs torch and transformers: "
                      'pip install "kvcore[transformers]"') from exc

from .._manager import KvCacheManager
from .._paged_handle import PagedKvCacheHandle
from .._slot_mapping import SlotMapping
from ..attention import PagedLayout, gather_kv
from ..errors import (CacheError, CapacityError, LayerIndexError, ShapeMismatchError,
                      WriteOrderError)
from ..models import AllocationRequest, CacheConfig
from ._cache_state import SAVED, fork_cache, load_cache, save_cache

__all__ = ["KvCoreCache", "cache_config_for"]

_TORCH_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16",
                 torch.float32: "float32"}


def cache_config_for(model_or_config: Any, *, num_blocks: int, block_size: int = 16,
                     dtype: Any = None, device: Any = None, **fields: Any) -> CacheConfig:
    """A :class:`~kvcore.CacheConfig` shaped for a transformers model (or its config):
    its decoder layers, KV heads and head size, and (from a model) its dtype and device."""
    config = getattr(model_or_config, "config", model_or_config)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    if dtype is None:
        dtype = _TORCH_DTYPES.get(getattr(model_or_config, "dtype", None), "float32")
    if device is None:
        device = str(getattr(model_or_config, "device", "cpu"))
    return CacheConfig(num_layers=text.num_hidden_layers, num_kv_heads=kv_heads,
                       head_dim=head_dim, dtype=dtype, block_size=block_size,
                       num_blocks=num_blocks, device=device, **fields)


class _KvCoreLayer(CacheLayerMixin):
    """One attention layer's view of a :class:`KvCoreCache`; all state is the cache's."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, owner: KvCoreCache, layer_idx: int) -> None:
        super().__init__()
        self._owner = owner
        self._layer_idx = layer_idx

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self._owner._update(key_states, value_states, self._layer_idx)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self._owner._layer_len[self._layer_idx]

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.is_initialized = False

    def offload(self) -> None:  # the pool stays where the manager put it
        pass

    def prefetch(self) -> None:
        pass



class KvCoreCache(Cache):
    """A transformers ``Cache`` storing K/V in a :class:`~kvcore.KvCacheManager`.

    ``manager`` must match the model: one kvcore layer per decoder layer, the model's
    KV heads, head size, dtype and device (:func:`cache_config_for` builds the
    config, :meth:`from_model` the whole thing).  Its backend must hold arrays torch can
    take without a copy (``torch``; ``numpy`` on the CPU works through DLPack).  Several
    caches may share one manager: prompt blocks written by one ``generate`` call are
    then reused by the next.  ``extra_key`` separates prefix-cache entries of different
    models or adapters sharing a manager.

    A cache serves one ``generate`` call; :meth:`release` (or leaving a ``with``
    block) frees its sequences, :meth:`reset` empties it for another call.
    """

    def __init__(self, manager: KvCacheManager, *, extra_key: str | None = None) -> None:
        if not isinstance(manager, KvCacheManager):
            raise TypeError(f"manager must be a kvcore.KvCacheManager, got "
                            f"{type(manager).__name__}")
        self._manager = manager
        self._extra_key = extra_key
        num_layers = manager.config.num_layers
        super().__init__(layers=[_KvCoreLayer(self, i) for i in range(num_layers)])
        self._prefix = f"hf-{uuid.uuid4().hex[:12]}"
        self._ids = itertools.count()
        self._prompts: list[tuple[int, ...]] | None = None
        self._prompt_width = 0
        self._clear()

    def _clear(self) -> None:
        self._handles: list[PagedKvCacheHandle] = []
        self._pads = np.zeros(0, dtype=np.int64)   # left padding of each row
        self._cached = np.zeros(0, dtype=np.int64)  # prompt tokens served by the prefix cache
        self._length = 0                            # the rectangle's width, pads included
        self._layer_len = [0] * self._manager.config.num_layers
        self._mapping: SlotMapping | None = None
        self._layout: PagedLayout | None = None

    @classmethod
    def from_model(cls, model: Any, *, backend: str | None = "torch", num_blocks: int = 512,
                   block_size: int = 16, extra_key: str | None = None,
                   **config_fields: Any) -> KvCoreCache:
        """A cache with a new manager shaped for ``model`` (its dtype and device)."""
        config = cache_config_for(model, num_blocks=num_blocks, block_size=block_size,
                                  **config_fields)
        return cls(KvCacheManager(config, backend=backend), extra_key=extra_key)

    # --- what the caller tells the cache -------------------------------------------------

    @property
    def manager(self) -> KvCacheManager:
        return self._manager

    @property
    def handles(self) -> list[PagedKvCacheHandle]:
        """One kvcore handle per batch row, in row order (after any beam reordering)."""
        return list(self._handles)

    @property
    def num_cached_tokens(self) -> list[int]:
        """Per row: prompt tokens the prefix cache already held at prefill."""
        return self._cached.tolist()

    def set_prompts(self, input_ids: Any, attention_mask: Any = None) -> None:
        """Tell the cache the prompts ``generate`` will get (the same ``input_ids`` and
        ``attention_mask``): padding is then not stored and full prompt blocks are
        shared through the prefix cache.  Padding must be on the left, as transformers
        pads decoder-only prompts for generation."""
        if self._handles:
            raise CacheError("set_prompts: this cache already holds a batch; call reset() "
                             "or use a new cache")
        ids = np.asarray(_to_numpy(input_ids), dtype=np.int64)
        if ids.ndim != 2:
            raise ShapeMismatchError(f"input_ids has shape {list(ids.shape)}, expected "
                                     "[batch, prompt_len]")
        if attention_mask is None:
            mask = np.ones_like(ids, dtype=bool)
        else:
            mask = np.asarray(_to_numpy(attention_mask)).astype(bool)
            if mask.shape != ids.shape:
                raise ShapeMismatchError(f"attention_mask has shape {list(mask.shape)}, "
                                         f"input_ids {list(ids.shape)}")
        # Left padding: once a row's mask turns on it stays on.
        if np.any(mask[:, :-1] & ~mask[:, 1:]):
            row = int(np.argmax(np.any(mask[:, :-1] & ~mask[:, 1:], axis=1)))
            raise ValueError(f"attention_mask row {row} is {mask[row].astype(int).tolist()}: "
                             "expected left padding (zeros only before the prompt); build "
                             "the batch with tokenizer.padding_side='left'")
        pads = ids.shape[1] - mask.sum(axis=1)
        self._prompts = [tuple(int(t) for t in row[p:]) for row, p in zip(ids, pads)]
        self._prompt_width = int(ids.shape[1])

    # --- the Cache API -------------------------------------------------------------------

    def _update(self, key: torch.Tensor, value: torch.Tensor,
                layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self._manager.config
        if not 0 <= layer < cfg.num_layers:
            raise LayerIndexError(f"layer {layer} is out of range: the cache has "
                                  f"{cfg.num_layers} layers")
        if key.dim() != 4 or tuple(key.shape[1::2]) != (cfg.num_kv_heads, cfg.head_dim) \
                or value.shape != key.shape:
            raise ShapeMismatchError(
                f"key/value have shapes {list(key.shape)} / {list(value.shape)}, expected "
                f"[batch, {cfg.num_kv_heads}, new_tokens, {cfg.head_dim}] for both")
        n = int(key.shape[2])
        done = self._layer_len[layer]
        if done == self._length:  # the first layer of a new forward pass
            if self._handles:
                self._extend(int(key.shape[0]), n)
            else:
                self._prefill(int(key.shape[0]), n)
        elif done + n != self._length:
            raise WriteOrderError(f"layer {layer} holds {done} tokens and got {n} more, but "
                                  f"this forward pass is at {self._length} tokens")
        if self._mapping is None:  # the prefill: only what the prefix cache lacks
            for row, handle in enumerate(self._handles):
                skip = int(self._pads[row] + self._cached[row])
                if skip < n:
                    self._manager.write(handle, layer, _rows(key[row, :, skip:]),
                                        _rows(value[row, :, skip:]), start=int(self._cached[row]))
        else:  # a step: one backend call for the whole batch
            flat = (key.shape[0] * n, cfg.num_kv_heads, cfg.head_dim)
            self._manager.write_slots(layer, self._mapping,
                                      key.transpose(1, 2).reshape(flat).contiguous(),
                                      value.transpose(1, 2).reshape(flat).contiguous())
        self._layer_len[layer] = done + n
        pool = self._manager.layer_pool(layer).native
        k, v = gather_kv(pool, self._layout)  # [batch, width, kv_heads, head_dim]
        return _as_torch(k).transpose(1, 2), _as_torch(v).transpose(1, 2)

    def _prefill(self, batch: int, n: int) -> None:
        """Allocate one sequence per row for the first forward pass."""
        if self._prompts is None:
            prompts: list[tuple[int, ...] | None] = [None] * batch
            pads = np.zeros(batch, dtype=np.int64)
        else:
            if n != self._prompt_width or batch % len(self._prompts):
                raise ShapeMismatchError(
                    f"the first forward pass has {batch} rows of {n} tokens, but set_prompts "
                    f"got {len(self._prompts)} prompts padded to {self._prompt_width} (rows "
                    "must be a multiple of the prompts: generate repeats each prompt for "
                    "beams and return sequences)")
            # generate expands each prompt with repeat_interleave (beams, samples).
            prompts = [p for p in self._prompts for _ in range(batch // len(self._prompts))]
            pads = np.asarray([n - len(p) for p in prompts], dtype=np.int64)
        handles: list[PagedKvCacheHandle] = []
        try:
            for prompt, pad in zip(prompts, pads):
                rid = self._new_id()
                if prompt is None:
                    request = AllocationRequest(request_id=rid, num_tokens=n)
                else:
                    # Rows of one batch share the prompt blocks they have in common at
                    # once: a row joins blocks an earlier row writes in this same
                    # forward pass, whose update() writes every row of a layer before
                    # any row reads it (the promise join_pending asks for).  The model
                    # computes every prompt token anyway (generate does not shorten
                    # the prefill), so a hit only saves storage: the last prompt
                    # token's block may be shared too (allow_full_hit).
                    request = AllocationRequest(request_id=rid, prompt_token_ids=prompt,
                                                extra_key=self._extra_key, join_pending=True,
                                                allow_full_hit=True)
                handles.append(self._manager.allocate(request))
        except BaseException:
            for handle in handles:  # all or nothing
                self._manager.deallocate(handle)
            raise
        self._handles = handles
        self._pads = pads
        self._cached = np.asarray([h.num_cached_tokens() for h in handles], dtype=np.int64)
        self._length = n
        self._mapping = None
        self._layout = PagedLayout.from_manager(self._manager, handles, width=n,
                                                left_padded=True)

    def _replace(self, row: int, handle: PagedKvCacheHandle) -> None:
        self._manager.deallocate(self._handles[row])
        self._handles[row] = handle
        self._layout = None

    def _extend(self, batch: int, n: int) -> None:
        if batch != len(self._handles):
            raise ShapeMismatchError(f"a forward pass of {batch} rows on a cache of "
                                     f"{len(self._handles)} rows; reorder or select rows first")
        self._mapping = self._manager.extend_batch(self._handles, n)
        self._length += n
        self._layout = PagedLayout.from_manager(self._manager, self._handles,
                                                width=self._length, left_padded=True)

    def _new_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    def _check_between_steps(self, op: str) -> None:
        if any(n != self._length for n in self._layer_len):
            raise CacheError(f"{op}: a forward pass is half done (layers hold "
                             f"{self._layer_len} tokens)")

    def reorder_cache(self, beam_idx: Any) -> None:
        """Row ``j`` becomes old row ``beam_idx[j]``.  The first row to pick an old row
        takes its sequence, later ones fork it (copy-on-write), unpicked rows are
        deallocated."""
        if not self._handles:
            return
        self._check_between_steps("reorder_cache")
        index = np.asarray(_to_numpy(beam_idx), dtype=np.int64).reshape(-1)
        rows = len(self._handles)
        if index.size and (index.min() < 0 or index.max() >= rows):
            raise ValueError(f"beam_idx {index.tolist()} names rows outside 0..{rows - 1}")
        if np.array_equal(index, np.arange(rows)):
            return
        taken: set[int] = set()
        new: list[PagedKvCacheHandle] = []
        try:
            for src in index.tolist():
                if src in taken:
                    new.append(self._manager.fork(self._handles[src], self._new_id()))
                else:
                    taken.add(src)
                    new.append(self._handles[src])
        except BaseException:
            for handle, src in zip(new, index.tolist()):
                if handle is not self._handles[src]:
                    self._manager.deallocate(handle)
            raise
        for row, handle in enumerate(self._handles):
            if row not in taken:
                self._manager.deallocate(handle)
        self._handles = new
        self._pads = self._pads[index]
        self._cached = self._cached[index]
        self._layout = None  # rebuilt with the next step's extend

    def batch_select_indices(self, indices: Any) -> None:
        """Keep the rows ``indices`` (in that order); the others are deallocated."""
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every row ``repeats`` times in place (forks; no data is copied)."""
        self.reorder_cache(np.repeat(np.arange(len(self._handles)), int(repeats)))

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens of every row (transformers passes
        a negative count, as ``DynamicCache`` takes it): assisted and speculative
        decoding roll rejected draft tokens back this way.  Uses
        :meth:`KvCacheManager.truncate`, which copies a shared last block before the
        row writes into it again."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative number of tokens "
                             "to remove, as transformers' DynamicCache takes it")
        if tokens_to_remove == 0 or not self._handles:
            return
        self._check_between_steps("crop")
        remove = -int(tokens_to_remove)
        shortest = min(h.num_tokens() for h in self._handles)
        if remove > shortest or remove > self._length:
            raise CapacityError(f"crop({tokens_to_remove}): a row holds only {shortest} tokens")
        for handle in self._handles:
            self._manager.truncate(handle, handle.num_tokens() - remove)
        self._length -= remove
        self._layer_len = [n - remove for n in self._layer_len]
        self._cached = np.minimum(self._cached,
                                  [h.num_tokens() for h in self._handles]).astype(np.int64)
        self._layout = None  # rebuilt with the next step's extend

    def reset(self) -> None:
        """Free every sequence and empty the cache (the prompts stay set)."""
        self.release()
        for layer in self.layers:
            layer.reset()

    def release(self) -> None:
        """Deallocate this cache's sequences; prefix-cached blocks stay reusable."""
        for handle in self._handles:
            if handle.is_valid():
                self._manager.deallocate(handle)
        self._clear()

    # --- copies and files: fork, copy, save, load ------------------------------------------

    def fork(self) -> KvCoreCache:
        """An independent copy of this cache on the same manager, in O(blocks).

        Every row becomes a copy-on-write fork of its sequence
        (:meth:`KvCacheManager.fork`): no K/V is copied until the copy or the original
        writes into a block they share, and then only that block (a row's partly
        filled last block, when its next token is written).  The two share the
        manager, and its blocks until written; nothing else: each has its own rows
        (its own :meth:`release`), lengths, padding, prompts and layer state.
        Generating from the copy leaves this cache as it was, so it can be copied
        again: transformers' prompt-reuse recipe,
        ``generate(..., cache=copy.deepcopy(prompt_cache))``.  A copy dropped without
        :meth:`release` gives its blocks back at the next fork, save or load on the
        manager after Python collects it.  Between forward passes only
        (:class:`~kvcore.errors.CacheError` otherwise).
        """
        return self._forked(None)

    def __copy__(self) -> KvCoreCache:
        """The same as :meth:`fork`: rows shared between two ``Cache`` objects would let
        one corrupt the other's lengths, so a shallow copy is a copy-on-write fork too
        (sharing the manager and, until written, the blocks)."""
        return self._forked(None)

    def __deepcopy__(self, memo: dict[int, Any]) -> KvCoreCache:
        """:meth:`fork`: the K/V are copied lazily, block by block, when written; the
        manager is shared, never copied."""
        return self._forked(memo)

    def _forked(self, memo: dict[int, Any] | None) -> KvCoreCache:
        return fork_cache(self, memo)

    def save(self, path: str | os.PathLike[str], *,
             metadata: Mapping[str, str] | None = None) -> None:
        """Write this cache to ``path``: its rows' K/V and token ids through
        :meth:`KvCacheManager.save` (safetensors), plus the batch layout (rows,
        padding, prompts, ``extra_key``) so :meth:`load` gives a cache that continues
        generation exactly where this one stands.  Between forward passes only."""
        save_cache(self, path, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, manager: KvCacheManager,
             extra_key: Any = SAVED) -> KvCoreCache:
        """A cache holding what :meth:`save` wrote, on ``manager`` (the model's layout;
        the block size may differ).  ``extra_key`` defaults to the saved cache's; its
        prompt blocks join ``manager``'s prefix cache under it.  All or nothing, and
        every problem is a typed error (:meth:`KvCacheManager.load`)."""
        return load_cache(cls, path, manager, extra_key)

    def __enter__(self) -> KvCoreCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return (f"KvCoreCache(rows={len(self._handles)}, tokens={self._length}, "
                f"backend={self._manager.backend.name!r})")



def _to_numpy(array: Any) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def _rows(states: torch.Tensor) -> torch.Tensor:
    """``[kv_heads, tokens, head_dim]`` -> the ``[tokens, kv_heads, head_dim]`` kvcore writes."""
    return states.transpose(0, 1).contiguous()


def _as_torch(array: Any) -> torch.Tensor:
    return array if isinstance(array, torch.Tensor) else torch.from_dlpack(array)
