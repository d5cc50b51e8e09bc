"""Backend-neutral array plumbing for the bench: inputs, dense baselines, first touch.

The bench must measure every backend the same way without knowing its library, so it
only uses what numpy, torch and cupy arrays share: ``__setitem__`` with slices,
``reshape``, DLPack, plus the backend's own ``from_numpy``.

Libraries with immutable arrays (``BackendCapabilities.mutable_pools=False``, JAX)
have no slice assignment; their dense baselines are written with the backend's own
bulk operations instead (:class:`DenseBaseline`): the same bytes, the same number of
calls, into a dense array laid out as a pool.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._backend import Backend
from .._device import Device, DType

__all__ = ["BenchArrays", "DenseBaseline"]


class BenchArrays:
    """Makes arrays of one backend's library for the bench, and touches them."""

    def __init__(self, backend: Backend, dtype: DType, device: Device, seed: int = 0) -> None:
        self.backend = backend
        self.dtype = dtype
        self.device = device
        self._rng = np.random.default_rng(seed)
        # Asynchronous immutable arrays (JAX) say when they are computed; decided
        # once, so a mutable library's copies pay no check.
        self._wait = not self.mutable and hasattr(backend.from_numpy(
            np.zeros(1, np.float32), dtype, device), "block_until_ready")

    def random(self, *shape: int) -> Any:
        """A native array of random values of the bench dtype on the bench device."""
        host = self._rng.standard_normal(shape, dtype=np.float32)
        return self.backend.from_numpy(host, self.dtype, self.device)

    @property
    def mutable(self) -> bool:
        """Whether the backend's arrays change in place (slice assignment works)."""
        return self.backend.capabilities().mutable_pools

    def index(self, ids: np.ndarray) -> Any:
        """``ids`` as the backend's index array on the bench device."""
        return self.backend.index_array(np.asarray(ids, dtype=np.int64), self.device)

    def zeros(self, *shape: int) -> Any:
        """A dense native array, touched (see :meth:`touch`)."""
        array = self.backend.from_numpy(np.zeros(shape, np.float32), self.dtype, self.device)
        self.touch(array)
        return array

    def touch(self, array: Any) -> None:
        """Write every page of ``array`` once.

        Fresh host memory is mapped lazily: the first write to each page faults, and on
        some machines that runs at a fraction of memory bandwidth.  A pool or a dense
        baseline must be touched before the clock starts, or the first timed pass would
        measure the kernel's page faults instead of the cache.  Device arrays are
        already backed, so only host arrays are touched (through a zero-copy DLPack
        view, whatever the library)."""
        if self.device.type != "cpu":
            return
        try:
            view = np.from_dlpack(array)
        except (TypeError, RuntimeError, BufferError, AttributeError):
            array[...] = 0  # the library's own fill, when DLPack cannot view it
            return
        if not view.flags.writeable:
            # An immutable array (JAX): its library wrote every element when it made
            # it, so its pages are mapped already; it cannot be written here anyway.
            return
        view[...] = 0

    def copy(self, array: Any) -> Any:
        """A plain copy in the array's own library (``clone`` for torch).  An
        immutable library's copy is waited for (JAX dispatches it asynchronously and
        ``synchronize`` only waits for the backend's own operations)."""
        clone = getattr(array, "clone", None)
        out = clone() if clone is not None else array.copy()
        if self._wait:
            out.block_until_ready()
        return out

    def sync(self) -> None:
        """Wait for queued device work (GPU backends), so the clock sees it."""
        self.backend.synchronize(self.device)


class DenseBaseline:
    """One dense ``[2, batch, tokens, heads, dim]`` array per layer, the baseline the
    ``append`` and ``read`` workloads write and copy.

    Mutable libraries write it by slice assignment.  Immutable ones cannot; for them
    the dense array is a pool of ``batch`` blocks of ``tokens`` slots (the same
    layout: slot ``b * tokens + t`` is ``[:, b, t]``) written with the backend's
    ``scatter``, one call per layer as with slice assignment, with every index built
    before the clock starts.
    """

    def __init__(self, arrays: BenchArrays, layers: int, batch: int, tokens: int,
                 heads: int, dim: int) -> None:
        self.arrays = arrays
        self.batch, self.tokens = batch, tokens
        self.mutable = arrays.mutable
        if self.mutable:
            self.layers = [arrays.zeros(2, batch, tokens, heads, dim) for _ in range(layers)]
        else:
            be = arrays.backend
            self.layers = [be.allocate_layer(batch, tokens, heads, dim, arrays.dtype,
                                             arrays.device) for _ in range(layers)]
        self._starts = np.arange(batch, dtype=np.int64) * tokens
        self._positions: dict[int, Any] = {}
        self._prefix: tuple[int, Any] | None = None

    def prepare(self, prefix: int, positions: range) -> None:
        """Build, before timing, the indices :meth:`write_prefix` and
        :meth:`write_position` will use (immutable libraries only)."""
        if self.mutable:
            return
        ids = (self._starts[:, None] + np.arange(prefix, dtype=np.int64)).reshape(-1)
        self._prefix = (prefix, self.arrays.index(ids))
        for pos in positions:
            self._positions[pos] = self.arrays.index(self._starts + pos)

    def write_prefix(self, layer: int, k: Any, v: Any) -> None:
        """Positions ``[0, prefix)`` of every sequence; ``k``/``v`` are
        ``[batch * prefix, heads, dim]``, sequence-major."""
        if self.mutable:
            d = self.layers[layer]
            n = k.shape[0] // self.batch
            d[0, :, :n] = k.reshape(self.batch, n, *k.shape[1:])
            d[1, :, :n] = v.reshape(self.batch, n, *v.shape[1:])
            return
        if self._prefix is None:
            raise RuntimeError("DenseBaseline.prepare() was not called")
        self.layers[layer] = self.arrays.backend.scatter(self.layers[layer],
                                                         self._prefix[1], (k, v))

    def write_position(self, layer: int, pos: int, k: Any, v: Any) -> None:
        """Position ``pos`` of every sequence; ``k``/``v`` are ``[batch, heads, dim]``."""
        if self.mutable:
            d = self.layers[layer]
            d[0, :, pos] = k
            d[1, :, pos] = v
            return
        self.layers[layer] = self.arrays.backend.scatter(self.layers[layer],
                                                         self._positions[pos], (k, v))

    def sequence(self, layer: int, plane: int, b: int) -> Any:
        """``[tokens, heads, dim]`` of sequence ``b`` (a view where the library has
        them), for the read baseline to copy."""
        return self.layers[layer][plane, b]
