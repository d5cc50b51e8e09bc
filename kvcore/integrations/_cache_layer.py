"""One decoder layer of a :class:`~kvcore.integrations.transformers.KvCoreCache`, as
transformers' ``CacheLayerMixin`` (what ``Cache.layers[i]`` holds): a view whose state
is the cache's."""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

__all__ = ["KvCoreLayer", "PoolLayer"]

#: A :class:`~kvcore.integrations.transformers.KvCoreCache`: named, not imported, since
#: the cache's module imports this one.
KvCoreCache = Any


class PoolLayer(CacheLayerMixin):
    """A layer whose K/V live in a kvcore pool, never in the layer: what every such
    layer does alike (initialisation on first update, nothing to reset, offload or
    prefetch).  Subclasses say where an update's K/V go (:meth:`_put`)."""

    is_compileable = False
    is_croppable = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self._put(key_states, value_states)

    def _put(self, key_states: torch.Tensor,
             value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this update's K/V; return the K/V the layer attends over."""
        raise NotImplementedError

    def reset(self) -> None:
        self.is_initialized = False

    def offload(self) -> None:  # the pool stays where the manager put it
        pass

    def prefetch(self) -> None:
        pass


class KvCoreLayer(PoolLayer):
    """One attention layer's view of a :class:`KvCoreCache`; all state is the cache's.
    A sliding-window layer says so (``is_sliding``, ``sliding_window``) as
    transformers' ``DynamicSlidingWindowLayer`` does: the mask code looks for it."""

    def __init__(self, owner: KvCoreCache, layer_idx: int, window: int | None) -> None:
        super().__init__()
        self._owner = owner
        self._layer_idx = layer_idx
        self.is_sliding = window is not None
        self.sliding_window = window

    def _put(self, key_states: torch.Tensor,
             value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._owner._update(key_states, value_states, self._layer_idx)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        past = self._owner._layer_len[self._layer_idx]
        window = self.sliding_window
        if window is None:
            return past + query_length, 0
        # DynamicSlidingWindowLayer's: the last window - 1 tokens plus the new ones.
        return min(past, window - 1) + query_length, max(past - window + 1, 0)

    def get_seq_length(self) -> int:
        return self._owner._layer_len[self._layer_idx]

    def get_max_length(self) -> int:
        return -1 if self.sliding_window is None else self.sliding_window
