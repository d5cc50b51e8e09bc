"""CuPy backend for kvcore.

``CupyBackend`` and ``CupyKvCacheHandle`` are imported on first access, so importing
this package (as kvcore's plugin discovery does) never imports cupy, and works on
machines without cupy or a GPU.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CupyBackend", "CupyKvCacheHandle"]


def __getattr__(name: str) -> Any:
    if name == "CupyBackend":
        from ._backend import CupyBackend
        return CupyBackend
    if name == "CupyKvCacheHandle":
        from ._handle import CupyKvCacheHandle
        return CupyKvCacheHandle
    raise AttributeError(f"module 'kv_cupy' has no attribute {name!r}")
