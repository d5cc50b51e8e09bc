"""Encoder-decoder models (T5, BART, ...): one kvcore manager behind transformers'
``EncoderDecoderCache(self_attention_cache, cross_attention_cache)``.

The manager's config (``cache_config_for``) has the decoder's self-attention layers
``0 .. L-1`` in full (or sliding) groups and its cross-attention layers ``L .. 2L-1``
in one ``cross`` group.  Each batch row is one kvcore sequence holding both: the
decoder's tokens, growing, and the encoder's output, written once.  The
:class:`~kvcore.integrations.transformers.KvCoreCache` over that manager is the
self-attention cache and owns the rows; :class:`KvCoreCrossAttentionCache` is a view
of the same rows' cross-attention part.  So beam search forks a row once and the
beams share its encoder part for good (it is never written again), where
``DynamicCache`` copies the encoder K/V into every beam's rows.

transformers' encoder-decoder attention writes cross-attention K/V with ``update`` in
the first decoder pass, then reads ``cache.layers[i].keys`` / ``.values`` directly
(``EncoderDecoderCache.is_updated``); here those are gathered from the pool on each
read, one ``index_select`` each, so the cache holds no dense copy of the encoder
output.  A row's sequence is allocated when the encoder's length is known: at the
first cross-attention update (the decoder's first self-attention writes of that pass
wait until then).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers.cache_utils import Cache, EncoderDecoderCache

from ..errors import CacheError, LayerIndexError, ShapeMismatchError, UnsupportedError
from ._batch_reads import rectangle_slots
from ._cache_layer import PoolLayer
from ._torch_arrays import kv_rows

if TYPE_CHECKING:
    from .._manager import KvCacheManager
    from .._paged_handle import PagedKvCacheHandle

#: A :class:`~kvcore.integrations.transformers.KvCoreCache`: named, not imported, since
#: the cache's module imports this one.
KvCoreCache = Any

__all__ = ["KvCoreCrossAttentionCache", "KvCoreEncoderDecoderCache"]


class _CrossLayer(PoolLayer):
    """Cross-attention layer ``i``: K/V read from the pool, never held here."""

    is_sliding = False

    def __init__(self, owner: KvCoreCrossAttentionCache, index: int) -> None:
        # No CacheLayerMixin.__init__: keys and values are read-only views here.
        self._owner = owner
        self._index = index
        self.is_initialized = False

    @property
    def keys(self) -> torch.Tensor | None:
        return self._owner._read(self._index, 0)

    @property
    def values(self) -> torch.Tensor | None:
        return self._owner._read(self._index, 1)

    def _put(self, key_states: torch.Tensor,
             value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._owner._write(key_states, value_states, self._index)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length(), 0

    def get_seq_length(self) -> int:
        return self._owner._held(self._index)

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        pass  # the rows are the self-attention cache's; it reorders them


class KvCoreCrossAttentionCache(Cache):
    """The cross-attention half of a :class:`KvCoreEncoderDecoderCache`: the encoder
    K/V of the rows the self-attention ``KvCoreCache`` owns.  Row operations
    (reorder, select, repeat, crop) are the owner's; here they do nothing."""

    def __init__(self, owner: KvCoreCache) -> None:
        if owner._cross_group is None:
            raise UnsupportedError("this KvCoreCache's manager has no cross-attention group; "
                                   "build it with cache_config_for(encoder_decoder_model, ...)")
        super().__init__(layers=[_CrossLayer(self, i) for i in range(len(owner._specs))])
        self._owner = owner
        cfg = owner.manager.config
        group = cfg.groups[owner._cross_group]
        self._shape = (group.num_kv_heads, group.k_dim, group.v_dim)
        self._base = min(group.layers)

    def _write(self, key: torch.Tensor, value: torch.Tensor,
               index: int) -> tuple[torch.Tensor, torch.Tensor]:
        owner = self._owner
        layers = len(self.layers)
        if not 0 <= index < layers:
            raise LayerIndexError(f"cross-attention layer {index} is out of range: the cache "
                                  f"has {layers} layers")
        heads, k_dim, v_dim = self._shape
        if key.dim() != 4 or value.dim() != 4 or key.shape[1] != heads \
                or key.shape[3] != k_dim or value.shape[:3] != key.shape[:3] \
                or value.shape[3] != v_dim:
            raise ShapeMismatchError(
                f"cross-attention layer {index}: key/value have shapes {list(key.shape)} / "
                f"{list(value.shape)}, expected [batch, {heads}, encoder_tokens, {k_dim}] / "
                f"[batch, {heads}, encoder_tokens, {v_dim}]")
        tokens = int(key.shape[2])
        if owner._waiting is not None:
            owner.allocate_waiting(tokens)
        elif not owner._handles:
            raise CacheError("cross-attention K/V came before the decoder's first pass; the "
                             "decoder's self-attention allocates the rows")
        if owner._cross_done[index]:
            raise CacheError(f"cross-attention layer {index} already holds the encoder's K/V; "
                             "the model reads them back with .keys / .values "
                             "(EncoderDecoderCache.is_updated)")
        if tokens != owner._encoder_tokens:
            raise ShapeMismatchError(f"cross-attention layer {index} got {tokens} encoder "
                                     f"tokens, the rows hold {owner._encoder_tokens}")
        rows = len(owner._handles) * owner._repeat
        if key.shape[0] != rows:
            raise ShapeMismatchError(f"cross-attention layer {index} got {key.shape[0]} rows; "
                                     f"the decoder's pass has {rows}")
        every, manager = owner._repeat, owner.manager
        for row, handle in enumerate(owner._handles):
            manager.write(handle, self._base + index, kv_rows(key[row * every]),
                          kv_rows(value[row * every]), start=0)
        owner._cross_done[index] = True
        return key, value

    def _held(self, index: int) -> int:
        owner = self._owner
        return owner._encoder_tokens if owner._cross_done and owner._cross_done[index] else 0

    def _read(self, index: int, plane: int) -> torch.Tensor | None:
        owner = self._owner
        if not self._held(index):
            return None
        group = owner._cross_group
        reads = owner._reads.get(group)
        if reads is None:
            reads = owner._reads[group] = self._index()
        slots, tokens = reads
        views = owner._pool_views(self._base + index)
        heads = self._shape[0]
        if len(views) == 1:
            pool = views[0][plane]
        else:
            pool = views[plane][0]
        rows = len(owner._handles) * owner._repeat
        out = pool.index_select(0, slots)
        return out.view(rows, tokens, heads, out.shape[-1]).transpose(1, 2)

    def _index(self) -> tuple[torch.Tensor, int]:
        owner = self._owner
        manager: KvCacheManager = owner.manager
        tokens = owner._encoder_tokens
        table = manager.vllm_block_table(owner._handles, group=owner._cross_group,
                                         pad_value=-1)
        rows = len(owner._handles)
        slots = rectangle_slots(table.block_tables, np.full(rows, tokens, dtype=np.int64),
                                np.zeros(rows, dtype=np.int64), tokens, 0, manager.block_size)
        if owner._repeat > 1:
            slots = np.repeat(slots, owner._repeat, axis=0)
        device = torch.device(str(manager.config.device))
        return torch.from_numpy(slots.reshape(-1)).to(device), tokens

    # Row operations belong to the self-attention cache, which owns the rows.
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        pass

    def batch_repeat_interleave(self, repeats: int) -> None:
        pass

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        pass

    def crop(self, tokens_to_remove: int) -> None:
        pass

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()


class KvCoreEncoderDecoderCache(EncoderDecoderCache):
    """transformers' ``EncoderDecoderCache`` over one kvcore manager: the decoder's
    self-attention in a :class:`~kvcore.integrations.transformers.KvCoreCache` (which
    owns the rows) and its cross-attention in a :class:`KvCoreCrossAttentionCache`
    over the same rows.  ``KvCoreCache.from_model(t5_or_bart_model, ...)`` builds
    one; pass it to ``generate`` as ``cache=``.  Row operations (beam reordering,
    selection, repetition, ``crop``) go to the self-attention cache, and the
    cross-attention part follows its rows."""

    def __init__(self, cache: KvCoreCache) -> None:
        super().__init__(cache, KvCoreCrossAttentionCache(cache))
        cache._paired = True

    @property
    def manager(self) -> KvCacheManager:
        return self.self_attention_cache.manager

    @property
    def handles(self) -> list[PagedKvCacheHandle]:
        return self.self_attention_cache.handles

    def set_prompts(self, input_ids: Any, attention_mask: Any = None) -> None:
        """The decoder's prompts (``decoder_input_ids``); see ``KvCoreCache.set_prompts``."""
        self.self_attention_cache.set_prompts(input_ids, attention_mask)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.self_attention_cache.reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.self_attention_cache.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.self_attention_cache.batch_select_indices(indices)

    def crop(self, tokens_to_remove: int) -> None:
        self.self_attention_cache.crop(tokens_to_remove)

    def release(self) -> None:
        """Deallocate the rows (both parts); the cache is empty afterwards."""
        self.self_attention_cache.release()
        self.cross_attention_cache.reset()
        for index in self.is_updated:
            self.is_updated[index] = False

    def reset(self) -> None:
        self.self_attention_cache.reset()
        self.cross_attention_cache.reset()
        for index in self.is_updated:
            self.is_updated[index] = False

    def fork(self) -> KvCoreEncoderDecoderCache:
        """Both parts forked together: the rows are copy-on-write forks
        (``KvCoreCache.fork``) sharing the encoder part for good."""
        new = KvCoreEncoderDecoderCache(self.self_attention_cache.fork())
        new.is_updated = dict(self.is_updated)
        return new

    def __copy__(self) -> KvCoreEncoderDecoderCache:
        return self.fork()

    def __deepcopy__(self, memo: dict[int, Any]) -> KvCoreEncoderDecoderCache:
        new = KvCoreEncoderDecoderCache(self.self_attention_cache.__deepcopy__(memo))
        new.is_updated = dict(self.is_updated)
        memo[id(self)] = new
        return new

    def __enter__(self) -> KvCoreEncoderDecoderCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"KvCoreEncoderDecoderCache({self.self_attention_cache!r})"
