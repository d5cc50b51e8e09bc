"""The array operations kvcore's generic code (paged attention) runs on cupy arrays."""

from __future__ import annotations

from typing import Any

import numpy as np

from kvcore._array_ops import NamespaceOps

__all__ = ["CupyOps"]


class CupyOps(NamespaceOps):
    """numpy's spelling over cupy; new arrays go to the GPU of the array they serve."""

    def from_host(self, host: np.ndarray, like: Any) -> Any:
        with self.xp.cuda.Device(like.device.id):  # the pool's GPU, not the current one
            return self.xp.asarray(host)

    def device_key(self, a: Any) -> str:
        return f"cuda:{a.device.id}"
