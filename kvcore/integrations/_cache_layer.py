"""One decoder layer of a :class:`~kvcore.integrations.transformers.KvCoreCache`, as
transformers' ``CacheLayerMixin`` (what ``Cache.layers[i]`` holds): a view whose state
is the cache's."""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

__all__ = ["KvCoreLayer"]

#: A :class:`~kvcore.integrations.transformers.KvCoreCache`: named, not imported, since
#: the cache's module imports this one.
KvCoreCache = Any


class KvCoreLayer(CacheLayerMixin):
    """One attention layer's view of a :class:`KvCoreCache`; all state is the cache's.
    A sliding-window layer says so (``is_sliding``, ``sliding_window``) as
    transformers' ``DynamicSlidingWindowLayer`` does: the mask code looks for it."""

    is_compileable = False
    is_croppable = True

    def __init__(self, owner: KvCoreCache, layer_idx: int, window: int | None) -> None:
        super().__init__()
        self._owner = owner
        self._layer_idx = layer_idx
        self.is_sliding = window is not None
        self.sliding_window = window

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
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

    def reset(self) -> None:
        self.is_initialized = False

    def offload(self) -> None:  # the pool stays where the manager put it
        pass

    def prefetch(self) -> None:
        pass
