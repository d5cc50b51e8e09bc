"""The array operations kvcore's generic code (paged attention) runs on cupy arrays."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from kvcore._array_ops import NamespaceOps

__all__ = ["CupyOps"]


class CupyOps(NamespaceOps):
    """numpy's spelling over cupy.  cupy launches every kernel on the *current* device,
    so kvcore's generic code runs inside :meth:`device_scope` (the array's GPU made
    current), and new arrays go to the GPU of the array they serve."""

    def from_host(self, host: np.ndarray, like: Any) -> Any:
        with like.device:  # the pool's GPU, not the current one
            # Staged through CuPy's pinned pool: the host does not wait for the GPU.
            return self.xp.asarray(host, blocking=False)

    def device_key(self, a: Any) -> str:
        with a.device:
            stream = self.xp.cuda.get_current_stream()
        return f"cuda:{a.device.id}@{stream.ptr}"

    def device_scope(self, like: Any) -> contextlib.AbstractContextManager[Any]:
        return like.device
