"""The handle class the numpy backend's managers hand out."""

from __future__ import annotations

import numpy as np

from kvcore import PagedKvCacheHandle


class NumpyKvCacheHandle(PagedKvCacheHandle):
    """A :class:`kvcore.PagedKvCacheHandle` whose reads come back as ``np.ndarray``."""

    __slots__ = ()

    def key_array(self, layer: int) -> np.ndarray | None:
        """Keys of ``layer`` as ``[tokens, heads, head_dim]``, or ``None``."""
        ref = self.key_cache(layer)
        return None if ref is None else ref.native

    def value_array(self, layer: int) -> np.ndarray | None:
        """Values of ``layer`` as ``[tokens, heads, head_dim]``, or ``None``."""
        ref = self.value_cache(layer)
        return None if ref is None else ref.native
