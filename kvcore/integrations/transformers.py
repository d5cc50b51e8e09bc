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

* each batch row is one kvcore sequence; the manager has the model's layer groups
  (:func:`cache_config_for`): full attention, sliding windows (a sliding layer keeps
  only the blocks its window still reads, and reports transformers' sliding
  ``kv_length`` / ``kv_offset``), and for encoder-decoder models a cross-attention
  group (:meth:`KvCoreCache.from_model` then returns a
  :class:`~kvcore.integrations._encoder_decoder.KvCoreEncoderDecoderCache`);
* the prefill writes each row through the manager and hands the model back the K/V it
  computed, as ``DynamicCache`` does; a decode step is one ``extend_batch`` and one
  ``write_slots`` per layer, and reads the rectangle back with one ``index_select``
  per layer through an index made once per step and layer group
  (:mod:`kvcore.integrations._batch_reads`);
* with :meth:`KvCoreCache.set_prompts`, left padding is stripped, rows are allocated
  with their token ids (full prompt blocks shared through the prefix cache, with
  earlier ``generate`` calls and with earlier rows of the same batch), and a prompt
  prefix the manager already holds is not computed again: ``get_seq_length()`` reports
  it and ``generate`` feeds only the rest (:mod:`kvcore.integrations._prompt_rows`);
* ``reorder_cache`` (beam search), ``batch_select_indices`` and
  ``batch_repeat_interleave`` map to :meth:`~kvcore.KvCacheManager.fork` and
  :meth:`~kvcore.KvCacheManager.deallocate`; ``crop(-n)`` (assisted decoding) to
  :meth:`~kvcore.KvCacheManager.truncate`;
* ``copy.deepcopy`` / ``copy.copy`` / :meth:`KvCoreCache.fork` fork every row on the
  same manager, :meth:`KvCoreCache.save` / :meth:`KvCoreCache.load` keep a cache in a
  safetensors file (:mod:`kvcore.integrations._cache_state`).

Not supported, and refused early with :class:`~kvcore.errors.UnsupportedError` naming
the model type: state-space and linear-attention layers (Mamba, Jamba, Zamba, ...) and
the other layouts :mod:`kvcore.integrations._model_groups` lists.
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
    from transformers.cache_utils import Cache
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("kvcore.integrations.transformers needs torch and transformers: "
                      'pip install "kvcore[transformers]"') from exc

from .._manager import KvCacheManager
from .._paged_handle import PagedKvCacheHandle
from .._slot_mapping import SlotMapping
from ..errors import (CacheError, CapacityError, LayerIndexError, ShapeMismatchError,
                      UnsupportedError, WriteOrderError)
from ..models import GroupKind
from ._batch_reads import PoolViews, advance, hide, rectangle_slots
from ._cache_layer import KvCoreLayer
from ._cache_state import SAVED, fork_cache, load_cache, save_cache
from ._encoder_decoder import KvCoreEncoderDecoderCache
from ._model_groups import cache_config_for
from ._prompt_rows import (PREFILL, STEP, allocate_rows, allocate_waiting, first_pass,
                           left_padded_prompts)
from ._token_ids import track_token_ids
from ._torch_arrays import kv_rows, to_numpy

__all__ = ["KvCoreCache", "KvCoreEncoderDecoderCache", "cache_config_for", "track_token_ids"]



class KvCoreCache(Cache):
    """A transformers ``Cache`` storing a decoder's self-attention K/V in a
    :class:`~kvcore.KvCacheManager`.

    ``manager`` must match the model: its layer groups, KV heads, head sizes, dtype
    and device (:func:`cache_config_for` builds the config, :meth:`from_model` the
    whole thing).  Its backend must hold arrays torch can take without a copy
    (``torch``; ``numpy`` on the CPU works through DLPack).  Several caches may share
    one manager: prompt blocks written by one ``generate`` call are then reused by
    the next.  ``extra_key`` separates prefix-cache entries of different models or
    adapters sharing a manager.  A manager with a cross-attention group serves an
    encoder-decoder model through :class:`KvCoreEncoderDecoderCache`.

    A cache serves one ``generate`` call; :meth:`release` (or leaving a ``with``
    block) frees its sequences, :meth:`reset` empties it for another call.
    """

    def __init__(self, manager: KvCacheManager, *, extra_key: str | None = None) -> None:
        if not isinstance(manager, KvCacheManager):
            raise TypeError(f"manager must be a kvcore.KvCacheManager, got "
                            f"{type(manager).__name__}")
        groups = manager.config.groups
        cross = [g for g in groups if g.kind is GroupKind.cross]
        token_layers = sorted(i for g in groups if g.kind is not GroupKind.cross
                              for i in g.layers)
        if token_layers != list(range(len(token_layers))) or len(cross) > 1 or any(
                g.kind is GroupKind.latent for g in groups):
            raise UnsupportedError(
                "KvCoreCache needs a manager whose decoder layers come first (full or "
                "sliding groups, layers 0..n-1) followed by at most one cross-attention "
                f"group; this one has groups {[(g.kind.value, g.layers) for g in groups]}")
        self._manager = manager
        self._extra_key = extra_key
        #: Per decoder layer: (group index, kv heads, K width, V width, window).
        self._specs = tuple(
            (g.index, g.num_kv_heads, g.k_dim, g.v_dim, g.window)
            for layer in token_layers for g in groups if layer in g.layers)
        self._cross_group = cross[0].index if cross else None
        self._windows = {spec[0]: spec[4] for spec in self._specs}  # group -> window
        super().__init__(layers=[KvCoreLayer(self, i, spec[4])
                                 for i, spec in enumerate(self._specs)])
        self._pool_views = PoolViews(manager)
        #: Whether a KvCoreEncoderDecoderCache serves this cache's cross-attention part.
        self._paired = False
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
        self._layer_len = [0] * len(self._specs)
        self._mapping: SlotMapping | None = None
        self._mode = STEP
        self._next_ids: torch.Tensor | None = None  # the pass's input ids (track_token_ids)
        self._reads: dict[int, tuple[torch.Tensor, int]] = {}   # this pass's, per group
        self._index: dict[int, np.ndarray] = {}  # per group: the last step's slots, kept
        self._repeat = 1          # batch rows per kvcore row in a first pass (beams)
        self._fresh = False       # rows allocated by set_prompts, no forward pass yet
        # Encoder-decoder models: rows are allocated when the encoder's length is known
        # (the first cross-attention update); the decoder's prefill writes wait here.
        self._encoder_tokens = 0
        self._waiting: tuple[list[tuple[int, ...] | None], np.ndarray] | None = None
        self._held_back: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self._cross_done = [False] * len(self._specs) if self._cross_group is not None else []

    @classmethod
    def from_model(cls, model: Any, *, backend: str | None = "torch", num_blocks: int = 512,
                   block_size: int = 16, extra_key: str | None = None,
                   **config_fields: Any) -> Any:
        """A cache with a new manager shaped for ``model`` (its layer groups, dtype and
        device; ``config_fields`` as for :func:`cache_config_for`).  For an
        encoder-decoder model (T5, BART, ...) it is a
        :class:`KvCoreEncoderDecoderCache` over one manager: the decoder's
        self-attention and its cross-attention, each row one kvcore sequence."""
        config = cache_config_for(model, num_blocks=num_blocks, block_size=block_size,
                                  **config_fields)
        cache = cls(KvCacheManager(config, backend=backend), extra_key=extra_key)
        if isinstance(model, torch.nn.Module):
            track_token_ids(model)
        if cache._cross_group is not None:
            return KvCoreEncoderDecoderCache(cache)
        return cache

    # --- what the caller tells the cache -------------------------------------------------

    @property
    def manager(self) -> KvCacheManager:
        return self._manager

    @property
    def handles(self) -> list[PagedKvCacheHandle]:
        """One kvcore handle per batch row, in row order (after any beam reordering)."""
        self._materialize()
        return list(self._handles)

    @property
    def num_cached_tokens(self) -> list[int]:
        """Per row: prompt tokens the prefix cache already held at allocation."""
        self._materialize()
        return self._cached.tolist()

    def set_prompts(self, input_ids: Any, attention_mask: Any = None) -> None:
        """Tell the cache the prompts ``generate`` will get (the same ``input_ids`` and
        ``attention_mask``; padding on the left, as transformers pads decoder-only
        prompts for generation).  Padding is then not stored, full prompt blocks are
        shared through the prefix cache, and a leading part of the batch the manager
        already holds is not computed again.

        Rows are allocated now, one per prompt, with their token ids.  The batch's
        reusable part is the columns every row already holds, padding included:
        ``min(padding + tokens already in the pool)`` over the rows, never the last
        column.  ``get_seq_length()`` then reports it, and ``generate`` feeds the model
        only the columns after it.  A row holding more than that recomputes the
        difference but keeps (and reads) the K/V the pool holds for it.  With beam
        search or several sequences per prompt, the first forward pass repeats each
        row (its copies share the prompt's blocks).  An encoder-decoder cache only
        records the prompts: its rows wait for the encoder's length."""
        if self._handles or self._waiting is not None:
            raise CacheError("set_prompts: this cache already holds a batch; call reset() "
                             "or use a new cache")
        prompts, pads, width = left_padded_prompts(input_ids, attention_mask)
        self._prompts, self._prompt_width = prompts, width
        if self._cross_group is not None or not prompts:
            return
        handles, cached, columns = allocate_rows(self, prompts, pads, width)
        self._handles, self._pads, self._cached = handles, pads, cached
        self._length = columns
        self._layer_len = [columns] * len(self._specs)
        self._fresh = True

    # --- the Cache API -------------------------------------------------------------------

    def _update(self, key: torch.Tensor, value: torch.Tensor,
                layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        specs = self._specs
        if not 0 <= layer < len(specs):
            raise LayerIndexError(f"layer {layer} is out of range: the cache has "
                                  f"{len(specs)} layers")
        group, heads, k_dim, v_dim, window = specs[layer]
        if key.dim() != 4 or value.dim() != 4 or key.shape[1] != heads \
                or key.shape[3] != k_dim or value.shape[:3] != key.shape[:3] \
                or value.shape[3] != v_dim:
            raise ShapeMismatchError(
                f"layer {layer}: key/value have shapes {list(key.shape)} / "
                f"{list(value.shape)}, expected [batch, {heads}, new_tokens, {k_dim}] / "
                f"[batch, {heads}, new_tokens, {v_dim}]; if the model's layers hand the "
                "cache other shapes than its config says, pass num_kv_heads= / head_dim= "
                "to from_model or cache_config_for")
        n = int(key.shape[2])
        done = self._layer_len[layer]
        if done == self._length:  # the first layer of a new forward pass
            self._begin_pass(int(key.shape[0]), n)
            done = self._length - n
        elif done + n != self._length:
            raise WriteOrderError(f"layer {layer} holds {done} tokens and got {n} more, but "
                                  f"this forward pass is at {self._length} tokens")
        mode = self._mode
        if mode is STEP:  # one backend call for the whole batch
            rows = key.shape[0] * n
            self._manager.write_slots(layer, self._mapping,
                                      key.transpose(1, 2).reshape(rows, heads, k_dim),
                                      value.transpose(1, 2).reshape(rows, heads, v_dim))
            self._layer_len[layer] = done + n
            return self._read(layer, group, window, n)
        self._layer_len[layer] = done + n
        if not self._handles:  # an encoder-decoder prefill before its rows exist
            self._held_back.append((layer, key, value))
            return key, value
        self._write_rows(layer, key, value)
        if mode is PREFILL:  # the model's own K/V, as DynamicCache hands them back
            return key, value
        return self._read(layer, group, window, n)

    def _write_rows(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """A first pass: each row writes the tokens the prefix cache lacks (the
        first of each group of ``_repeat`` identical rows writes for the group)."""
        first = self._length - int(key.shape[2])  # the pass's first column
        every = self._repeat
        for row, handle in enumerate(self._handles):
            cached, pad = int(self._cached[row]), int(self._pads[row])
            skip = pad + cached - first  # >= 0: the reuse rule never skips unwritten tokens
            if skip < key.shape[2]:
                self._manager.write(handle, layer, kv_rows(key[row * every, :, skip:]),
                                    kv_rows(value[row * every, :, skip:]), start=cached)

    def _read(self, layer: int, group: int, window: int | None,
              n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rectangle of ``layer`` after this pass's write: every column for a full
        layer, the last ``min(past, window - 1) + n`` for a sliding one."""
        reads = self._reads.get(group)
        if reads is None:
            reads = self._reads[group] = self._rectangle(group, window, n)
        index, width = reads
        return self._pool_views.gather(layer, index, len(self._handles) * self._repeat,
                                       width)

    def _rectangle(self, group: int, window: int | None, n: int) -> tuple[torch.Tensor, int]:
        """This pass's index of ``group``: a decode step advances the last step's by
        one column (:func:`advance`), anything else reads the block tables."""
        total = self._length
        width = total if window is None else min(total - n, window - 1) + n
        slots = self._index.get(group) if self._mode is STEP else None
        if slots is None:
            slots = self._rebuilt(group, total - width)
            if self._mode is STEP:
                self._index[group] = slots
        else:
            slots = hide(slots, total - width, self._pads, self._mapping.group_slots[group])
        if self._repeat > 1:
            slots = np.repeat(slots, self._repeat, axis=0)
        device = torch.device(str(self._manager.config.device))
        return torch.from_numpy(slots.reshape(-1)).to(device), width

    def _rebuilt(self, group: int, first_column: int) -> np.ndarray:
        """The rectangle's slots of ``group`` from column ``first_column`` on, read
        from the manager's block tables."""
        table = self._manager.vllm_block_table(self._handles, group=group, pad_value=-1)
        return rectangle_slots(table.block_tables, table.seq_lens.astype(np.int64),
                               self._pads, self._length, first_column,
                               self._manager.block_size)

    def _begin_pass(self, batch: int, n: int) -> None:
        self._materialize()
        self._reads = {}
        if self._handles and not self._fresh:
            self._extend(batch, n)
            return
        if self._cross_group is not None and not self._paired:
            raise UnsupportedError(
                "this KvCoreCache's manager has a cross-attention group: an encoder-decoder "
                "model needs its self- and cross-attention caches apart; use "
                "KvCoreEncoderDecoderCache(cache) (KvCoreCache.from_model builds one)")
        self._index = {}
        first_pass(self, batch, n)

    def _materialize(self) -> None:
        """Fork each row into the copies its first pass computed (between passes)."""
        if self._repeat > 1 and all(n == self._length for n in self._layer_len):
            repeat, self._repeat = self._repeat, 1
            self.batch_repeat_interleave(repeat)

    def allocate_waiting(self, encoder_tokens: int) -> None:
        """Encoder-decoder models: allocate the first pass's rows now that the
        encoder's length is known (:func:`~kvcore.integrations._prompt_rows.allocate_waiting`)."""
        allocate_waiting(self, encoder_tokens)

    def _extend(self, batch: int, n: int) -> None:
        if batch != len(self._handles):
            raise ShapeMismatchError(f"a forward pass of {batch} rows on a cache of "
                                     f"{len(self._handles)} rows; reorder or select rows first")
        ids, self._next_ids = self._next_ids, None
        if ids is not None and (ids.dim() != 2 or tuple(ids.shape) != (batch, n)):
            ids = None
        mapping = self._manager.extend_batch(
            self._handles, n, token_ids=None if ids is None else to_numpy(ids))
        past, self._length, self._mode, self._mapping = self._length, self._length + n, \
            STEP, mapping
        if n != 1:
            self._index = {}
            return
        bs = self._manager.block_size
        for group, slots in self._index.items():
            window = self._windows[group]
            keep = past if window is None else min(past, window - 1)
            self._index[group] = advance(slots, mapping.group_slots[group], mapping.starts,
                                         keep, bs)

    def _new_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    def _check_between_steps(self, op: str) -> None:
        if any(n != self._length for n in self._layer_len):
            raise CacheError(f"{op}: a forward pass is half done (layers hold "
                             f"{self._layer_len} tokens)")
        self._materialize()

    def reorder_cache(self, beam_idx: Any) -> None:
        """Row ``j`` becomes old row ``beam_idx[j]``.  The first row to pick an old row
        takes its sequence, later ones fork it (copy-on-write), unpicked rows are
        deallocated."""
        if not self._handles:
            return
        self._check_between_steps("reorder_cache")
        index = np.asarray(to_numpy(beam_idx), dtype=np.int64).reshape(-1)
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
        self._reads = {}
        # A fork reads its parent's blocks until it writes: the same slots.
        self._index = {group: slots[index] for group, slots in self._index.items()}

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
        row writes into it again; a sliding-window layer cannot go back past what its
        window gave back (:class:`~kvcore.errors.CapacityError`)."""
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
        self._reads = {}
        self._index = {}

    def reset(self) -> None:
        """Free every sequence and empty the cache (the prompts stay set; the next
        ``generate`` allocates its rows at its first forward pass)."""
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
