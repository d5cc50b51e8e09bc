"""Harness: managers, data and read-back checks for one backend, dtype and device.

A test talks to the backend only through the documented contract: it writes with
``Backend.from_numpy`` arrays, reads through handles and ``Backend.to_numpy``, and
compares the bits with a dense numpy reference.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvcore import (
    AllocationRequest,
    Backend,
    CacheConfig,
    Device,
    DType,
    KvCacheManager,
    PagedKvCacheHandle,
    TensorRef,
)

from .._clauses import Clause, check, check_equal, fail
from .._data import assert_same_bits, hashed_kv, random_kv, special_kv

__all__ = ["Harness"]

#: The small model shape every manager test uses unless it says otherwise.
SHAPE = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "block_size": 4, "num_blocks": 32}


class Harness:
    """Everything a contract test needs on one (backend, dtype, device)."""

    def __init__(self, backend: Backend, dtype: DType, device: Device, *, seed: int = 0):
        self.backend = backend
        self.dtype = dtype
        self.device = device
        self.rng = np.random.default_rng(seed)
        self.heads = SHAPE["num_kv_heads"]
        self.dim = SHAPE["head_dim"]

    def __repr__(self) -> str:
        return f"Harness({self.backend.name!r}, {self.dtype.value}, {self.device})"

    # --- managers -----------------------------------------------------------------

    def config(self, **fields: Any) -> CacheConfig:
        merged = {**SHAPE, "dtype": self.dtype, "device": self.device, **fields}
        return CacheConfig(**merged)

    def manager(self, **fields: Any) -> KvCacheManager:
        """A manager of the small shape on this backend (``fields`` override it)."""
        config = self.config(**fields)
        self.heads, self.dim = config.num_kv_heads, config.head_dim
        return KvCacheManager(config, backend=self.backend)

    @staticmethod
    def allocate(mgr: KvCacheManager, request_id: str, num_tokens: int = 0,
                 prompt: tuple[int, ...] | None = None, **extra: Any) -> PagedKvCacheHandle:
        if prompt is not None:
            # The suite checks storage-level sharing: a whole cached prompt may be served.
            extra.setdefault("allow_full_hit", True)
            return mgr.allocate(AllocationRequest(request_id=request_id,
                                                  prompt_token_ids=prompt, **extra))
        return mgr.allocate(AllocationRequest(request_id=request_id, num_tokens=num_tokens,
                                              **extra))

    # --- data ---------------------------------------------------------------------

    def kv(self, n: int) -> np.ndarray:
        """``[n, heads, dim]`` host rows of ordinary values (random bits of normal
        finite numbers) in this dtype."""
        return random_kv(self.rng, n, self.heads, self.dim, self.dtype)

    def special(self, n: int, shift: int = 0) -> np.ndarray:
        """``[n, heads, dim]`` host rows of special values (signed zeros, subnormals,
        extremes, infinities, NaN payloads; see :func:`special_kv`)."""
        return special_kv(n, self.heads, self.dim, self.dtype, shift=shift)

    def keyed(self, keys: np.ndarray) -> np.ndarray:
        """Host rows that are a fixed function of ``keys`` (see :func:`hashed_kv`)."""
        return hashed_kv(keys, self.heads, self.dim, self.dtype)

    def native(self, host: np.ndarray) -> Any:
        return self.backend.from_numpy(host, self.dtype, self.device)

    def host(self, obj: TensorRef | Any) -> np.ndarray:
        native = obj.native if isinstance(obj, TensorRef) else obj
        self.backend.synchronize(self.device)
        return self.backend.to_numpy(native)

    def write(self, mgr: KvCacheManager, handle: PagedKvCacheHandle | str, layer: int,
              key: np.ndarray, value: np.ndarray, *, start: int | None = None) -> None:
        mgr.write(handle, layer, self.native(key), self.native(value), start=start)

    def fill(self, mgr: KvCacheManager, handle: PagedKvCacheHandle,
             start: int = 0) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Write fresh data to positions ``[start, num_tokens)`` of every layer."""
        n = handle.num_tokens() - start
        out = {}
        for layer in range(mgr.config.num_layers):
            k, v = self.kv(n), self.kv(n)
            if n:  # a write of zero tokens is refused; nothing to do
                self.write(mgr, handle, layer, k, v, start=start)
            out[layer] = (k, v)
        return out

    # --- checks -------------------------------------------------------------------

    def check_ref(self, item: Clause, ref: Any, shape: tuple[int, ...], what: str) -> None:
        """``ref`` is a TensorRef of ``shape`` with the cache's dtype and device."""
        if not isinstance(ref, TensorRef):
            fail(item, f"{what} did not return a kvcore.TensorRef", seen=type(ref).__name__,
                 expected="TensorRef")
        check_equal(tuple(ref.shape), tuple(shape), item, f"{what}: TensorRef.shape")
        check_equal(ref.dtype, self.dtype, item, f"{what}: TensorRef.dtype")
        check_equal(ref.device, self.device, item, f"{what}: TensorRef.device")
        described = self.backend.describe(ref.native)
        check_equal(tuple(described[0]), tuple(shape), item,
                    f"{what}: shape of the native array (describe)")
        check_equal(described[1], self.dtype, item, f"{what}: dtype of the native array")

    def expect_kv(self, item: Clause, handle: PagedKvCacheHandle, layer: int,
                  key: np.ndarray, value: np.ndarray, what: str = "") -> None:
        """``handle`` reads back exactly ``key``/``value`` for ``layer``."""
        label = f"{what}{': ' if what else ''}layer {layer} of {handle.request_id!r}"
        for kv, want, read in ((0, key, handle.key_cache), (1, value, handle.value_cache)):
            name = "key_cache" if kv == 0 else "value_cache"
            ref = read(layer)
            if len(want) == 0:
                check(ref is None, item, f"{label}: {name} with nothing written must be None",
                      seen=ref, expected=None)
                continue
            check(ref is not None, item, f"{label}: {name} returned None after a write",
                  seen=None, expected=f"{len(want)} tokens")
            self.check_ref(item, ref, want.shape, f"{label}: {name}")
            assert_same_bits(item, self.host(ref), want, self.dtype, f"{label}: {name}")
