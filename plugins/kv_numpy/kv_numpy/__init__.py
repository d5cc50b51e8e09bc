"""NumPy backend for kvcore.

``NumpyBackend`` and ``NumpyKvCacheHandle`` are imported on first access, so importing
this package (as kvcore's plugin discovery does) costs nothing.
"""

from __future__ import annotations

from typing import Any

__all__ = ["NumpyBackend", "NumpyKvCacheHandle"]


def __getattr__(name: str) -> Any:
    if name == "NumpyBackend":
        from ._backend import NumpyBackend
        return NumpyBackend
    if name == "NumpyKvCacheHandle":
        from ._handle import NumpyKvCacheHandle
        return NumpyKvCacheHandle
    raise AttributeError(f"module 'kv_numpy' has no attribute {name!r}")
