"""KvStore: the K/V pools on the backend, and everything that moves array data.

One pool per layer, ``[2, num_blocks, block_size, kv_heads, head_dim]`` (K at plane
0, V at plane 1), made by the backend when the manager is built and released by
:meth:`KvStore.close`.  Every pool-changing backend call returns the pool that now
holds the data (contract version 2) and the store keeps what it gets back, so
immutable array libraries work like mutable ones.

The store also knows, per physical block and layer, whether the block holds all its
``block_size`` tokens (``filled``), and whether it does for every layer
(``complete``).  Only complete blocks are served from the prefix cache, so a request
never reads K/V nobody has written yet; the prefix index reads ``complete``.

Arrays handed in (K/V to write) are validated here: the backend's own type or any
DLPack producer on the cache's device, the cache's dtype (never cast), the expected
shape; anything else is a typed error naming what was given and what was expected.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._backend import Backend
from ._tensor_ref import TensorRef
from .errors import (DeviceMismatchError, DtypeMismatchError, KvCoreError, PoolAllocationError,
                     ShapeMismatchError)
from .models import CacheConfig

__all__ = ["KvStore"]


class KvStore:
    """The pools of one manager (see the module docstring)."""

    def __init__(self, config: CacheConfig, backend: Backend) -> None:
        self.config = config
        self.backend = backend
        c = config
        self.pools: list[Any] = allocate_pools(backend, c, c.num_blocks, c.device)
        self.filled = np.zeros((c.num_blocks, c.num_layers), dtype=bool)
        self.complete = np.zeros(c.num_blocks, dtype=bool)
        self.closed = False
        # For fast_kv: the backend's own array type, and the row shape expected.
        self._native_type = type(self.pools[0])
        self._shapes: dict[int, tuple[int, int, int]] = {}

    # --- indices ------------------------------------------------------------------

    def index(self, ids: np.ndarray) -> Any:
        """Slot or block ids as the backend's index on the cache's device."""
        return self.backend.index_array(ids, self.config.device)

    # --- validation ---------------------------------------------------------------

    def native_kv(self, key: Any, value: Any, tokens: int | None) -> tuple[Any, Any, int]:
        """K and V as backend arrays of the cache's dtype and ``[n, heads, dim]`` shape
        (``n == tokens`` when given, else any ``n >= 1``, the same for both)."""
        be, c = self.backend, self.config
        out = []
        for what, obj in (("key", key), ("value", value)):
            try:
                native = be.asarray(obj, c.device)
            except (KvCoreError, TypeError):
                raise
            except Exception as exc:  # a backend's untyped refusal: name it, typed
                raise TypeError(f"{what}: backend {be.name!r} could not take a "
                                f"{type(obj).__name__}: {type(exc).__name__}: {exc}") from exc
            shape, dtype, device = be.describe(native)
            if device != c.device:
                raise DeviceMismatchError(f"{what} is on {device}, the cache is on {c.device}")
            if dtype is not c.dtype:
                seen = dtype.value if dtype is not None else str(getattr(native, "dtype", "?"))
                raise DtypeMismatchError(f"{what} has dtype {seen}, the cache holds "
                                         f"{c.dtype.value}; kvcore does not cast, convert it first")
            want = (tokens if tokens is not None else (shape[0] if shape else -1),
                    c.num_kv_heads, c.head_dim)
            if len(shape) != 3 or tuple(shape) != want or want[0] < 1:
                expect = (f"[{tokens if tokens is not None else 'n >= 1'}, {c.num_kv_heads}, "
                          f"{c.head_dim}]")
                raise ShapeMismatchError(f"{what} has shape {list(shape)}, expected {expect} "
                                         "(tokens, num_kv_heads, head_dim)")
            out.append(native)
            tokens = shape[0]
        return out[0], out[1], int(tokens)  # type: ignore[arg-type]

    def fast_kv(self, key: Any, value: Any, tokens: int) -> bool:
        """Whether ``key`` and ``value`` are the backend's own arrays with exactly the
        cache's dtype, device and ``[tokens, heads, dim]`` shape: the common case,
        checked without converting anything.  ``False`` means "use :meth:`native_kv`"
        (which converts, or names what is wrong)."""
        native = self._native_type
        if type(key) is not native or type(value) is not native:
            return False
        shape = self._shapes.get(tokens)
        if shape is None:
            c = self.config
            shape = self._shapes[tokens] = (tokens, c.num_kv_heads, c.head_dim)
        describe, c = self.backend.describe, self.config
        k_shape, k_dtype, k_device = describe(key)
        v_shape, v_dtype, v_device = describe(value)
        return (tuple(k_shape) == shape and tuple(v_shape) == shape and k_dtype is c.dtype
                and v_dtype is c.dtype and k_device == c.device and v_device == c.device)

    # --- data ---------------------------------------------------------------------

    def scatter(self, layer: int, index: Any, key: Any, value: Any) -> None:
        self.pools[layer] = self.backend.scatter(self.pools[layer], index, (key, value))

    def gather(self, layer: int, plane: int, index: Any) -> Any:
        return self.backend.gather(self.pools[layer], plane, index)

    def copy_blocks(self, src: np.ndarray, dst: np.ndarray) -> None:
        """Copy whole blocks (every layer, K and V) and their written state."""
        if not src.size:
            return
        self.pools = list(self.backend.copy_blocks_layers(self.pools, self.index(src),
                                                          self.index(dst)))
        self.filled[dst] = self.filled[src]
        self.complete[dst] = self.complete[src]

    def reset_blocks(self, blocks: np.ndarray) -> None:
        """Fresh blocks hold nothing of anyone's: not filled for any layer."""
        if blocks.size:
            self.filled[blocks] = False
            self.complete[blocks] = False

    def mark_filled(self, layer: int | np.ndarray, blocks: np.ndarray) -> np.ndarray:
        """``layer`` (one, or an array of layers) now holds every token of ``blocks``;
        returns the blocks that just became complete (every layer)."""
        if not blocks.size:
            return blocks
        if isinstance(layer, np.ndarray):
            self.filled[np.ix_(blocks, layer)] = True
        else:
            self.filled[blocks, layer] = True
        now = self.filled[blocks].all(axis=1)
        new = blocks[now & ~self.complete[blocks]]
        self.complete[blocks] = now
        return new

    def unfill(self, blocks: np.ndarray) -> None:
        """``blocks`` will be written again (a truncated tail): not complete for any
        layer until they are."""
        self.reset_blocks(blocks)

    def layer_pool(self, layer: int) -> TensorRef:
        c = self.config
        return TensorRef(self.pools[layer],
                         (2, c.num_blocks, c.block_size, c.num_kv_heads, c.head_dim),
                         c.dtype, c.device, self.backend)

    def close(self) -> None:
        """Release every pool through the backend; the store is unusable afterwards."""
        if self.closed:
            return
        self.closed = True
        pools, self.pools = self.pools, []
        release_pools(self.backend, pools)


def allocate_pools(backend: Backend, config: CacheConfig, num_blocks: int, device: Any, *,
                   pinned: bool = False) -> list[Any]:
    """One zero-filled pool per layer, all or nothing: if any allocation fails, the
    pools made so far are released and :class:`PoolAllocationError` names the bytes."""
    c = config
    pools: list[Any] = []
    try:
        for _ in range(c.num_layers):
            pools.append(backend.allocate_layer(num_blocks, c.block_size, c.num_kv_heads,
                                                c.head_dim, c.dtype, device, pinned=pinned))
    except BaseException as exc:
        release_pools(backend, pools)
        if isinstance(exc, KvCoreError) or not isinstance(exc, (MemoryError, RuntimeError,
                                                                 ValueError, OverflowError)):
            raise
        nbytes = c.bytes_per_block // c.num_layers * num_blocks
        raise PoolAllocationError(f"backend {backend.name!r} could not allocate a pool of "
                                  f"{nbytes} bytes per layer ({c.num_layers} layers, "
                                  f"{nbytes * c.num_layers} bytes in all) on {device}: "
                                  f"{type(exc).__name__}: {exc}") from exc
    return pools


def release_pools(backend: Backend, pools: list[Any]) -> None:
    for pool in pools:
        backend.release_layer(pool)
