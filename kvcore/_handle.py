"""KvCacheHandle: the interface every cache handle implements.

It mirrors the fifteen methods of the reference ``KvCacheHandle`` trait one to one and
keeps them as methods (not properties) so code ported from the trait reads the same.
"""

from __future__ import annotations

import abc
from typing import TypeVar, overload

from ._block_table import BlockTable
from ._device import Device
from ._tensor_ref import TensorRef
from .models import CacheHandleStats

__all__ = ["KvCacheHandle"]

H = TypeVar("H", bound="KvCacheHandle")


class KvCacheHandle(abc.ABC):
    """One sequence's paged K/V cache.

    Thirteen methods are abstract; :meth:`num_tokens` and :meth:`kv_cache` are
    provided from the others.  Data access on a handle whose cache was deallocated
    raises :class:`~kvcore.errors.InvalidHandleError`.
    """

    @abc.abstractmethod
    def block_table(self) -> BlockTable:
        """A snapshot of the block table (changing it changes nothing)."""

    @abc.abstractmethod
    def block_table_mut(self) -> BlockTable:
        """The live block table.  Handles owned by a manager guard it: growth goes
        through the manager so accounting and copy-on-write stay right."""

    @overload
    def as_any(self) -> KvCacheHandle: ...
    @overload
    def as_any(self, cls: type[H]) -> H: ...

    def as_any(self, cls: type[H] | None = None) -> KvCacheHandle | H:
        """The concrete handle, for backend-specific methods.

        ``as_any()`` returns it as is; ``as_any(SomeHandle)`` returns it typed as
        ``SomeHandle`` or raises ``TypeError`` naming the class it really is.
        """
        if cls is None:
            return self
        if not isinstance(cls, type):
            raise TypeError(f"as_any expects a class, got {cls!r}")
        if not isinstance(self, cls):
            raise TypeError(f"handle is a {type(self).__module__}.{type(self).__qualname__}, "
                            f"not a {cls.__module__}.{cls.__qualname__}")
        return self

    @abc.abstractmethod
    def device(self) -> Device:
        """Where the cache's arrays live."""

    @abc.abstractmethod
    def num_layers(self) -> int: ...

    @abc.abstractmethod
    def num_heads(self) -> int:
        """K/V heads per layer (the model's ``num_key_value_heads``)."""

    @abc.abstractmethod
    def head_dim(self) -> int: ...

    @abc.abstractmethod
    def key_cache(self, layer: int) -> TensorRef | None:
        """Keys of ``layer`` in logical order, ``[tokens, heads, head_dim]``, or
        ``None`` when nothing is cached for that layer.  Raises
        :class:`~kvcore.errors.LayerIndexError` for a layer out of range."""

    @abc.abstractmethod
    def value_cache(self, layer: int) -> TensorRef | None:
        """Values of ``layer``; see :meth:`key_cache`."""

    @abc.abstractmethod
    def clone_handle(self) -> KvCacheHandle:
        """A second reference to the same cache (not a copy of the data)."""

    @abc.abstractmethod
    def stats(self) -> CacheHandleStats: ...

    @abc.abstractmethod
    def is_valid(self) -> bool:
        """``False`` once the cache was deallocated."""

    @abc.abstractmethod
    def cache_id(self) -> str:
        """A stable id of the cache (shared by clones)."""

    # --- provided -----------------------------------------------------------------

    def num_tokens(self) -> int:
        """Tokens in the sequence, from the block table."""
        return self.block_table().sequence_length

    def kv_cache(self, layer: int) -> tuple[TensorRef, TensorRef] | None:
        """``(key_cache(layer), value_cache(layer))``, or ``None`` if nothing is cached."""
        key = self.key_cache(layer)
        if key is None:
            return None
        value = self.value_cache(layer)
        if value is None:  # a handle must cache K and V together
            return None
        return key, value
