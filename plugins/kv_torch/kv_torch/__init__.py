"""PyTorch backend for kvcore.

``TorchBackend`` and ``TorchKvCacheHandle`` are imported on first access, so importing
this package (as kvcore's plugin discovery does) never imports torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TorchBackend", "TorchKvCacheHandle"]


def __getattr__(name: str) -> Any:
    if name == "TorchBackend":
        from ._backend import TorchBackend
        return TorchBackend
    if name == "TorchKvCacheHandle":
        from ._handle import TorchKvCacheHandle
        return TorchKvCacheHandle
    raise AttributeError(f"module 'kv_torch' has no attribute {name!r}")
