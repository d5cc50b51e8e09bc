"""ArrayOps: the array operations kvcore's generic code runs on a backend's arrays.

Paged attention (:mod:`kvcore.attention`) is written once for every array library:
it asks the backend that owns the pool for an :class:`ArrayOps` (through
:meth:`Backend.array_ops`) and calls only the methods below, plus the operators every
array library spells the same way (``+ - * / @``, ``reshape``, indexing with a
boolean mask broadcast).  A third-party backend gets ``kvcore.attention`` by returning
one from ``array_ops()``; for a library following the Python array API standard,
:class:`NamespaceOps` over its namespace is usually all it takes.

The quantized codecs (:mod:`kvcore._codecs`) use a few more operations (``abs``,
``divide``, ``multiply``, ``clip``, ``rint``, ``astype``, ``stack``, and the float8 conversions).  They are not
abstract, so an ``ArrayOps`` written before them still works: its backend simply
serves no codec (the defaults raise :class:`~kvcore.errors.UnsupportedError`).
"""

from __future__ import annotations

import abc
import contextlib
from typing import Any

from collections.abc import Mapping

import numpy as np

from ._device import DType
from .errors import UnsupportedError

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

    # --- what the quantized codecs need (kvcore._codecs); optional --------------------

    def _no_codec_op(self, op: str) -> UnsupportedError:
        return UnsupportedError(f"the {self.name} array operations ({type(self).__name__}) "
                                f"have no {op!r}, which kvcore's quantized codecs need")

    def abs(self, a: Any) -> Any:
        """Elementwise absolute value."""
        raise self._no_codec_op("abs")

    def divide(self, a: Any, b: Any) -> Any:
        """Elementwise IEEE ``a / b`` (broadcast), giving infinities and NaNs for
        division by zero without warnings or errors."""
        raise self._no_codec_op("divide")

    def multiply(self, a: Any, b: Any) -> Any:
        """Elementwise IEEE ``a * b`` (broadcast), ``0 * inf`` giving NaN without
        warnings or errors."""
        raise self._no_codec_op("multiply")

    def clip(self, a: Any, lo: float, hi: float) -> Any:
        """Elementwise ``min(max(a, lo), hi)``; a NaN stays NaN."""
        raise self._no_codec_op("clip")

    def rint(self, a: Any) -> Any:
        """Round to the nearest integer, ties to even (IEEE ``roundTiesToEven``)."""
        raise self._no_codec_op("rint")

    def astype(self, a: Any, dtype: DType) -> Any:
        """``a`` converted to the kvcore ``dtype`` (a float dtype, ``int8`` or
        ``uint8``), as the library's cast does (round to nearest even; for integers,
        only values the type holds are passed)."""
        raise self._no_codec_op("astype")

    def stack(self, arrays: list[Any]) -> Any:
        """The arrays (one shape and dtype) stacked along a new first axis."""
        raise self._no_codec_op("stack")

    def float8_bits(self, a: Any, dtype: DType) -> Any:
        """float32 ``a`` rounded to nearest even into the float8 ``dtype``
        (``float8_e4m3`` or ``float8_e5m2``; values are within its finite range), as
        ``uint8`` bit patterns."""
        raise self._no_codec_op(f"float8_bits({dtype.value})")

    def float8_values(self, codes: Any, dtype: DType) -> Any:
        """``uint8`` bit patterns of the float8 ``dtype`` as float32 values (exact)."""
        raise self._no_codec_op(f"float8_values({dtype.value})")


class NamespaceOps(ArrayOps):
    """:class:`ArrayOps` over a numpy-like namespace (numpy, cupy, ``jax.numpy``):
    everything is spelled as in numpy.  ``from_host`` puts data on the default device
    of the namespace; libraries with several devices override it."""

    #: Whether the namespace's arrays can be assigned to (numpy, cupy; not JAX).
    mutable = True

    def __init__(self, xp: Any, name: str | None = None, *,
                 dtypes: Mapping[DType, Any] | None = None) -> None:
        """``dtypes`` maps kvcore dtypes to the library's (default: the namespace's
        attributes of the same name, ``float8_e4m3fn`` for ``float8_e4m3``; a library
        without ``bfloat16`` or float8 in its namespace passes them here, as numpy
        does with ``ml_dtypes``)."""
        self.xp = xp
        self.name = name or xp.__name__.split(".", 1)[0]
        if dtypes is None:
            found = {d: getattr(xp, _NAMESPACE_NAMES.get(d, d.value), None) for d in DType}
            dtypes = {d: t for d, t in found.items() if t is not None}
        self.dtypes: dict[DType, Any] = dict(dtypes)
        # numpy warns (or raises, under np.seterr) on 0/0 and x/0; IEEE results wanted.
        self._numpy = xp is np
        self._tables: dict[DType, np.ndarray] = {}

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

    def abs(self, a: Any) -> Any:
        return self.xp.abs(a)

    def divide(self, a: Any, b: Any) -> Any:
        if not self._numpy:
            return a / b
        with np.errstate(divide="ignore", invalid="ignore"):  # a fresh one: thread-safe
            return a / b

    def multiply(self, a: Any, b: Any) -> Any:
        if not self._numpy:
            return a * b
        with np.errstate(invalid="ignore"):
            return a * b

    def clip(self, a: Any, lo: float, hi: float) -> Any:
        return self.xp.clip(a, lo, hi)

    def rint(self, a: Any) -> Any:
        return self.xp.rint(a)

    def _dtype(self, dtype: DType) -> Any:
        native = self.dtypes.get(dtype)
        if native is None:
            raise UnsupportedError(f"{self.name} has no {dtype.value} dtype")
        return native

    def astype(self, a: Any, dtype: DType) -> Any:
        native = self._dtype(dtype)
        return a if a.dtype == native else a.astype(native)

    def stack(self, arrays: list[Any]) -> Any:
        return self.xp.stack(arrays)

    def float8_bits(self, a: Any, dtype: DType) -> Any:
        return a.astype(self._dtype(dtype)).view(self._dtype(DType.uint8))

    def float8_values(self, codes: Any, dtype: DType) -> Any:
        if self._numpy:
            # A table of the 256 values: ml_dtypes' element-by-element cast measured
            # about 5x slower than this gather (same values, exactly).
            table = self._tables.get(dtype)
            if table is None:
                table = self._tables[dtype] = (np.arange(256, dtype=np.uint8)
                                               .view(self._dtype(dtype)).astype(np.float32))
            return table.take(codes)
        return codes.view(self._dtype(dtype)).astype(self._dtype(DType.float32))


#: Names of kvcore dtypes in array namespaces, where they differ.
_NAMESPACE_NAMES = {DType.float8_e4m3: "float8_e4m3fn"}
