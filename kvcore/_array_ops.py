"""ArrayOps: the array operations kvcore's generic code runs on a backend's arrays.

Paged attention (:mod:`kvcore.attention`) is written once for every array library:
it asks the backend that owns the pool for an :class:`ArrayOps` (through
:meth:`Backend.array_ops`) and calls only the methods below, plus the operators every
array library spells the same way (``+ - * / @``, ``reshape``, indexing with a
boolean mask broadcast).  A third-party backend gets ``kvcore.attention`` by returning
one from ``array_ops()``; for a library following the Python array API standard,
:class:`NamespaceOps` over its namespace is usually all it takes.
"""

from __future__ import annotations

import abc
import contextlib
from typing import Any

import numpy as np

__all__ = ["ArrayOps", "NamespaceOps"]


class ArrayOps(abc.ABC):
    """What kvcore's generic array code needs from one array library."""

    #: The library's import name (``"numpy"``, ``"torch"``...).
    name: str

    @property
    def array_modules(self) -> tuple[str, ...]:
        """Top-level modules whose arrays belong to this library (what
        ``type(a).__module__`` starts with): ``(name,)`` unless the array type lives
        elsewhere (JAX arrays are ``jaxlib`` objects)."""
        return (self.name,)

    @abc.abstractmethod
    def from_host(self, host: np.ndarray, like: Any) -> Any:
        """``host`` as an array of this library on ``like``'s device (a copy)."""

    @abc.abstractmethod
    def take1(self, a: Any, index: Any) -> Any:
        """``a`` indexed along axis 1 by the one-dimensional ``index``."""

    @abc.abstractmethod
    def float32(self, a: Any) -> Any:
        """``a`` as float32 (no copy if it already is)."""

    @abc.abstractmethod
    def cast_like(self, a: Any, like: Any) -> Any:
        """``a`` in ``like``'s dtype."""

    @abc.abstractmethod
    def permute(self, a: Any, axes: tuple[int, ...]) -> Any:
        """``a`` with its axes reordered."""

    @abc.abstractmethod
    def where(self, cond: Any, a: Any, b: Any) -> Any:
        """Elementwise ``a if cond else b`` (``a`` or ``b`` may be Python scalars)."""

    @abc.abstractmethod
    def amax(self, a: Any) -> Any:
        """Maximum over the last axis, keeping it (size 1)."""

    @abc.abstractmethod
    def sum(self, a: Any) -> Any:
        """Sum over the last axis, keeping it (size 1)."""

    @abc.abstractmethod
    def exp(self, a: Any) -> Any:
        """Elementwise ``e ** a``."""

    @abc.abstractmethod
    def isfinite(self, a: Any) -> Any:
        """Elementwise finiteness."""

    @abc.abstractmethod
    def device_key(self, a: Any) -> str:
        """A string naming ``a``'s device (and, for libraries with streams, the current
        stream), for caches of arrays copied there."""

    def zero_rows(self, a: Any, mask: np.ndarray) -> Any:
        """``a`` (``[batch, tokens, ...]``, an array kvcore just made) with the rows where
        the host boolean ``mask`` (``[batch, tokens]``) is true set to zero: the padding
        of a batch read.  The default builds a new array with :meth:`where`; libraries
        with mutable arrays override it to write in place."""
        keep = self.from_host(~mask.reshape(mask.shape + (1,) * (a.ndim - 2)), a)
        return self.where(keep, a, 0)

    def device_scope(self, like: Any) -> contextlib.AbstractContextManager[Any]:
        """A context in which this library's operators (``@``, ``*``, comparisons)
        launch on ``like``'s device.  Libraries that run an operation on its operands'
        device anyway (numpy, torch) keep this default; cupy launches on the *current*
        device, so its ops make ``like``'s device current."""
        return contextlib.nullcontext()


class NamespaceOps(ArrayOps):
    """:class:`ArrayOps` over a numpy-like namespace (numpy, cupy, ``jax.numpy``):
    everything is spelled as in numpy.  ``from_host`` puts data on the default device
    of the namespace; libraries with several devices override it."""

    #: Whether the namespace's arrays can be assigned to (numpy, cupy; not JAX).
    mutable = True

    def __init__(self, xp: Any, name: str | None = None) -> None:
        self.xp = xp
        self.name = name or xp.__name__.split(".", 1)[0]

    def zero_rows(self, a: Any, mask: np.ndarray) -> Any:
        if not self.mutable:
            return super().zero_rows(a, mask)
        a[self.from_host(mask, a)] = 0
        return a

    def from_host(self, host: np.ndarray, like: Any) -> Any:
        return self.xp.asarray(host)

    def take1(self, a: Any, index: Any) -> Any:
        return self.xp.take(a, index, axis=1)

    def float32(self, a: Any) -> Any:
        return a if a.dtype == self.xp.float32 else a.astype(self.xp.float32)

    def cast_like(self, a: Any, like: Any) -> Any:
        return a if a.dtype == like.dtype else a.astype(like.dtype)

    def permute(self, a: Any, axes: tuple[int, ...]) -> Any:
        return self.xp.transpose(a, axes)

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        return self.xp.where(cond, a, b)

    def amax(self, a: Any) -> Any:
        return self.xp.max(a, axis=-1, keepdims=True)

    def sum(self, a: Any) -> Any:
        return self.xp.sum(a, axis=-1, keepdims=True)

    def exp(self, a: Any) -> Any:
        return self.xp.exp(a)

    def isfinite(self, a: Any) -> Any:
        return self.xp.isfinite(a)

    def device_key(self, a: Any) -> str:
        return "cpu"
