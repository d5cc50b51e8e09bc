"""Backend-neutral array plumbing for the bench: inputs, dense baselines, first touch.

The bench must measure every backend the same way without knowing its library, so it
only uses what numpy, torch and cupy arrays share: ``__setitem__`` with slices,
``reshape``, DLPack, plus the backend's own ``from_numpy``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._backend import Backend
from .._device import Device, DType

__all__ = ["BenchArrays"]


class BenchArrays:
    """Makes arrays of one backend's library for the bench, and touches them."""

    def __init__(self, backend: Backend, dtype: DType, device: Device, seed: int = 0) -> None:
        self.backend = backend
        self.dtype = dtype
        self.device = device
        self._rng = np.random.default_rng(seed)

    def random(self, *shape: int) -> Any:
        """A native array of random values of the bench dtype on the bench device."""
        host = self._rng.standard_normal(shape, dtype=np.float32)
        return self.backend.from_numpy(host, self.dtype, self.device)

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
        view[...] = 0

    def copy(self, array: Any) -> Any:
        """A plain copy in the array's own library (``clone`` for torch)."""
        clone = getattr(array, "clone", None)
        return clone() if clone is not None else array.copy()

    def sync(self) -> None:
        """Wait for queued device work (GPU backends), so the clock sees it."""
        self.backend.synchronize(self.device)
