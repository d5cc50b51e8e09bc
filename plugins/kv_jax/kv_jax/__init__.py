"""JAX backend for kvcore.

``JaxBackend`` and ``JaxKvCacheHandle`` are imported on first access, so importing
this package (as kvcore's plugin discovery does) never imports jax.
"""

from __future__ import annotations

from typing import Any

__all__ = ["JaxBackend", "JaxKvCacheHandle"]


def __getattr__(name: str) -> Any:
    if name == "JaxBackend":
        from ._backend import JaxBackend
        return JaxBackend
    if name == "JaxKvCacheHandle":
        from ._handle import JaxKvCacheHandle
        return JaxKvCacheHandle
    raise AttributeError(f"module 'kv_jax' has no attribute {name!r}")
