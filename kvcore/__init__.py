"""kvcore: a paged key/value cache for LLM inference, on any array library.

Quick start::

    import numpy as np
    import kvcore

    cfg = kvcore.CacheConfig(num_layers=2, num_kv_heads=4, head_dim=64, num_blocks=256)
    mgr = kvcore.KvCacheManager(cfg, backend="numpy")
    h = mgr.allocate(kvcore.AllocationRequest(request_id="seq-0", num_tokens=10))
    mgr.write(h, 0, k, v)            # k, v: [10, 4, 64] float16
    keys = h.key_cache(0)            # TensorRef, [10, 4, 64], logical order

Backends are plugins (entry-point group ``kvcore``); see :func:`list_backends` and
:func:`get_backend`.  Errors live in :mod:`kvcore.errors`.
"""

from __future__ import annotations

from . import errors
from ._backend import KVCORE_API_VERSION, Backend, BackendCapabilities
from ._batch_read import BatchKv
from ._block_table import BlockTable
from ._device import CODEC_DTYPES, FLOAT_DTYPES, Device, DType
from ._handle import KvCacheHandle
from ._hookspecs import BackendSpec, hookimpl, hookspec
from ._manager import KvCacheManager
from ._paged_handle import PagedKvCacheHandle
from ._codecs import Codec, codec_for
from ._cache_file import CacheFileInfo, CacheLayout, SavedSequence, inspect_cache_file
from ._registry import (BackendRecord, get_backend, list_backends, refresh_backends,
                        register_backend, unregister_backend)
from ._slot_mapping import FlashInferPageTable, SlotMapping, VllmBlockTable
from ._tensor_ref import TensorRef
from ._version import __version__
from .models import (AllocationRequest, CacheConfig, CacheGcStats, CacheHandleStats,
                     CacheManagerStats, MemoryPressure, blocks_in_budget, bytes_per_token)

__all__ = [
    "KVCORE_API_VERSION",
    "AllocationRequest",
    "Backend",
    "BackendCapabilities",
    "BackendRecord",
    "BackendSpec",
    "BatchKv",
    "BlockTable",
    "CODEC_DTYPES",
    "CacheConfig",
    "CacheFileInfo",
    "CacheGcStats",
    "CacheHandleStats",
    "CacheLayout",
    "CacheManagerStats",
    "Codec",
    "DType",
    "Device",
    "FLOAT_DTYPES",
    "FlashInferPageTable",
    "KvCacheHandle",
    "KvCacheManager",
    "MemoryPressure",
    "PagedKvCacheHandle",
    "SavedSequence",
    "SlotMapping",
    "TensorRef",
    "VllmBlockTable",
    "__version__",
    "blocks_in_budget",
    "bytes_per_token",
    "codec_for",
    "errors",
    "get_backend",
    "hookimpl",
    "hookspec",
    "inspect_cache_file",
    "list_backends",
    "refresh_backends",
    "register_backend",
    "unregister_backend",
]
