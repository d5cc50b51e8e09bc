"""The handle class the cupy backend's managers hand out.

It imports cupy only for type checking, so ``kv_cupy.CupyKvCacheHandle`` can be
imported (for ``as_any`` and ``isinstance``) on machines without cupy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvcore import PagedKvCacheHandle

if TYPE_CHECKING:
    import cupy


class CupyKvCacheHandle(PagedKvCacheHandle):
    """A :class:`kvcore.PagedKvCacheHandle` whose reads come back as ``cupy.ndarray``.

    Reach it with ``handle.as_any(CupyKvCacheHandle)``.
    """

    __slots__ = ()

    def key_array(self, layer: int) -> cupy.ndarray | None:
        """Keys of ``layer`` as ``[tokens, heads, head_dim]`` on the GPU, or ``None`` if
        none were written yet."""
        ref = self.key_cache(layer)
        return None if ref is None else ref.native

    def value_array(self, layer: int) -> cupy.ndarray | None:
        """Values of ``layer`` as ``[tokens, heads, head_dim]`` on the GPU, or ``None``."""
        ref = self.value_cache(layer)
        return None if ref is None else ref.native

    def kv_arrays(self, layer: int) -> tuple[cupy.ndarray, cupy.ndarray] | None:
        """``(keys, values)`` of ``layer``, or ``None`` if none were written yet."""
        pair = self.kv_cache(layer)
        return None if pair is None else (pair[0].native, pair[1].native)
