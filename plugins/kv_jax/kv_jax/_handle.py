"""The handle class the jax backend's managers hand out."""

from __future__ import annotations

import jax

from kvcore import PagedKvCacheHandle

__all__ = ["JaxKvCacheHandle"]


class JaxKvCacheHandle(PagedKvCacheHandle):
    """A :class:`kvcore.PagedKvCacheHandle` whose reads come back as ``jax.Array``.

    Reach it with ``handle.as_any(JaxKvCacheHandle)``.  Every read is a new array
    (JAX arrays never change), so a read taken before a write keeps what it saw.
    """

    __slots__ = ()

    def key_array(self, layer: int) -> jax.Array | None:
        """Keys of ``layer`` as ``[tokens, heads, head_dim]``, or ``None`` if none were
        written yet."""
        ref = self.key_cache(layer)
        return None if ref is None else ref.native

    def value_array(self, layer: int) -> jax.Array | None:
        """Values of ``layer`` as ``[tokens, heads, head_dim]``, or ``None``."""
        ref = self.value_cache(layer)
        return None if ref is None else ref.native

    def kv_arrays(self, layer: int) -> tuple[jax.Array, jax.Array] | None:
        """``(keys, values)`` of ``layer``, or ``None`` if none were written yet."""
        pair = self.kv_cache(layer)
        return None if pair is None else (pair[0].native, pair[1].native)

    def pool_array(self, layer: int) -> jax.Array:
        """The whole pool of ``layer`` as it is now (``[2, blocks, block_size, heads,
        dim]``, K at 0, V at 1), for a jitted attention kernel.

        A snapshot: the cache's next write to ``layer`` donates this array's buffer,
        after which the array is deleted and using it raises JAX's ``RuntimeError``
        (never stale data).  Take it again after each write.
        """
        return self._manager.layer_pool(layer).native
