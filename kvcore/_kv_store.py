"""KvStore: one layer group's K/V pools on the backend, and everything that moves
array data.

Each layer of the group keeps its K/V in one or more pools
``[planes, num_blocks, block_size, heads, dim]`` made by the backend when the manager
is built and released by :meth:`KvStore.close`, as its :class:`LayerLayout` says:

* a K/V layer: one pool of two planes (K at 0, V at 1), the layout vLLM writes;
* a layer whose V is narrower or wider than K: one pool per plane;
* a latent (MLA) layer: one pool of one plane, one vector per token;
* a quantized cache (a codec dtype, :mod:`kvcore._codecs`): the same code pools, of
  ``uint8`` / ``int8``, plus one ``float32`` pool of the scales ``[planes, ..., heads,
  1]`` (one per token, head and plane).  Writes encode once per layer and scatter
  once per pool; reads gather codes and scales and decode them.

Every pool-changing backend call returns the pool that now holds the data (contract
version 2) and the store keeps what it gets back, so immutable array libraries work
like mutable ones.

The store also knows, per physical block and layer, whether the block holds all its
``block_size`` tokens (``filled``), and whether it does for every layer of the group
(``complete``).  Only complete blocks are served from the prefix cache, so a request
never reads K/V nobody has written yet; the prefix index reads ``complete``.

Arrays handed in (K/V to write) are validated here: the backend's own type or any
DLPack producer on the cache's device, the cache's dtype (never cast), the expected
shape; anything else is a typed error naming what was given and what was expected.
K/V are given and read in the config's ``compute_dtype`` (the cache's dtype, unless it
is a codec).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ._backend import Backend
from ._codecs import Codec
from ._device import DType
from ._tensor_ref import TensorRef
from .errors import (DeviceMismatchError, DtypeMismatchError, KvCoreError, PoolAllocationError,
                     ShapeMismatchError, UnsupportedError)
from .models import CacheConfig, GroupKind, GroupLayout

__all__ = ["KvStore", "LayerLayout", "PoolSpec"]


class PoolSpec(NamedTuple):
    planes: int
    heads: int
    dim: int
    #: The pool's element type: the cache's dtype, or a codec's code / scale dtype.
    dtype: DType


class LayerLayout:
    """How one layer of a group stores what a write gives it: its pools, and where
    each plane (0 is K or the latent vector, 1 is V) lives; for a codec, also where
    each plane's scales live."""

    def __init__(self, group: GroupLayout, dtype: DType = DType.float16,
                 codec: Codec | None = None) -> None:
        heads, k_dim, v_dim = group.num_kv_heads, group.k_dim, group.v_dim
        store = dtype if codec is None else codec.code_dtype
        if v_dim is None:  # latent: one plane
            self.pools: tuple[PoolSpec, ...] = (PoolSpec(1, heads, k_dim, store),)
            self.sources: tuple[tuple[int, int], ...] = ((0, 0),)
        elif v_dim == k_dim:
            self.pools = (PoolSpec(2, heads, k_dim, store),)
            self.sources = ((0, 0), (0, 1))
        else:
            self.pools = (PoolSpec(1, heads, k_dim, store), PoolSpec(1, heads, v_dim, store))
            self.sources = ((0, 0), (1, 0))
        self.planes = len(self.sources)
        self.row_shapes = tuple((heads, self.pools[p].dim) for p, _ in self.sources)
        self.codec = codec
        #: Where each plane's scales live (codecs): the last pool, one plane each.
        self.scale_sources: tuple[tuple[int, int], ...] = ()
        if codec is not None:
            self.scale_sources = tuple((len(self.pools), p) for p in range(self.planes))
            self.pools += (PoolSpec(self.planes, heads, 1, codec.scale_dtype),)

    def rows_per_pool(self, planes: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """The arrays to scatter into each code pool, from one array per plane."""
        if len(self.pools) == 1 or (self.codec is not None and len(self.pools) == 2):
            return [planes]
        return [(planes[0],), (planes[1],)]


class KvStore:
    """The pools of one layer group (see the module docstring)."""

    def __init__(self, config: CacheConfig, group: GroupLayout, backend: Backend) -> None:
        self.config = config
        self.group = group
        self.backend = backend
        #: The dtype K/V are given and read in (the config's compute_dtype).
        self.kv_dtype: DType = config.compute_dtype  # type: ignore[assignment]
        self.codec: Codec | None = config.codec
        self.layout = LayerLayout(group, config.dtype, self.codec)
        self.num_blocks = group.num_blocks
        self.layers = group.layers
        #: ``pools[local layer][i]``: the layer's i-th pool (see :class:`LayerLayout`).
        self.pools: list[list[Any]] = allocate_pools(backend, config, self.layout,
                                                     len(group.layers), group.num_blocks,
                                                     config.device)
        self.filled = np.zeros((group.num_blocks, len(group.layers)), dtype=bool)
        self.complete = np.zeros(group.num_blocks, dtype=bool)
        self.closed = False
        # For fast_kv: the backend's own array type, and the row shape expected.
        self._native_type = type(self.pools[0][0])
        # Whether the backend reads whole blocks (Backend.gather_blocks overridden).
        self._whole_blocks = type(backend).gather_blocks is not Backend.gather_blocks
        self._shapes: dict[int, tuple[tuple[int, ...], ...]] = {}
        if self.codec is not None:
            # A codec's writes encode and its reads decode: the float paths below stay
            # as they are (no per-call check of which kind of store this is).
            self._ops = backend.array_ops()
            self.scatter = self._scatter_codes  # type: ignore[method-assign]
            self.gather = self._gather_codes  # type: ignore[method-assign]
            self.gather_blocks = self._gather_blocks_codes  # type: ignore[method-assign]

    # --- indices ------------------------------------------------------------------

    def index(self, ids: np.ndarray) -> Any:
        """Slot or block ids as the backend's index on the cache's device."""
        return self.backend.index_array(ids, self.config.device)

    def flat_pools(self) -> list[Any]:
        return [pool for pools in self.pools for pool in pools]

    def set_flat_pools(self, flat: list[Any]) -> None:
        it = iter(flat)
        self.pools = [[next(it) for _ in pools] for pools in self.pools]

    # --- validation ---------------------------------------------------------------

    def native_kv(self, key: Any, value: Any, tokens: int | None) -> tuple[tuple[Any, ...], int]:
        """K and V (or the latent vector, with ``value`` None) as backend arrays of the
        cache's compute dtype and ``[n, heads, dim]`` shapes (``n == tokens`` when given, else
        any ``n >= 1``, the same for every plane)."""
        be, c, layout = self.backend, self.config, self.layout
        if layout.planes == 1 and value is not None:
            raise TypeError(f"a latent ('{GroupKind.latent.value}') layer keeps one vector per "
                            "token: pass it as key and value=None")
        if layout.planes == 2 and value is None:
            raise TypeError("value is None; this layer keeps K and V")
        out = []
        for what, obj, (heads, dim) in zip(("key", "value"), (key, value), layout.row_shapes):
            if isinstance(obj, np.ndarray) and not obj.dtype.isnative:
                # Every backend refuses these the same way (torch would raise its own).
                raise DtypeMismatchError(f"{what} has dtype {obj.dtype.str} (non-native byte "
                                         f"order), the cache holds {c.dtype.value}; convert it "
                                         "first: a.astype(a.dtype.newbyteorder('='))")
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
            if dtype is not self.kv_dtype:
                seen = dtype.value if dtype is not None else str(getattr(native, "dtype", "?"))
                holds = (c.dtype.value if self.codec is None else
                         f"{c.dtype.value} codes written and read as {self.kv_dtype.value}")
                raise DtypeMismatchError(f"{what} has dtype {seen}, the cache holds "
                                         f"{holds}; kvcore does not cast, convert it first")
            want = (tokens if tokens is not None else (shape[0] if shape else -1), heads, dim)
            if len(shape) != 3 or tuple(shape) != want or want[0] < 1:
                expect = f"[{tokens if tokens is not None else 'n >= 1'}, {heads}, {dim}]"
                raise ShapeMismatchError(f"{what} has shape {list(shape)}, expected {expect} "
                                         "(tokens, heads, dim)")
            out.append(native)
            tokens = shape[0]
        return tuple(out), int(tokens)  # type: ignore[arg-type]

    def fast_kv(self, key: Any, value: Any, tokens: int) -> bool:
        """Whether ``key`` and ``value`` are the backend's own arrays with exactly the
        cache's dtype, device and shapes: the common case, checked without converting
        anything.  ``False`` means "use :meth:`native_kv`" (which converts, or names
        what is wrong).  K/V layers only."""
        native = self._native_type
        if type(key) is not native or type(value) is not native:
            return False
        shapes = self._shapes.get(tokens)
        if shapes is None:
            shapes = self._shapes[tokens] = tuple((tokens, *shape)
                                                  for shape in self.layout.row_shapes)
        if len(shapes) != 2:
            return False
        describe, device, dtype = self.backend.describe, self.config.device, self.kv_dtype
        k_shape, k_dtype, k_device = describe(key)
        v_shape, v_dtype, v_device = describe(value)
        return (tuple(k_shape) == shapes[0] and tuple(v_shape) == shapes[1]
                and k_dtype is dtype and v_dtype is dtype
                and k_device == device and v_device == device)

    # --- data ---------------------------------------------------------------------

    def scatter(self, local: int, index: Any, planes: tuple[Any, ...]) -> None:
        """Write one array per plane of layer ``local`` at the slots of ``index``."""
        pools = self.pools[local]
        scatter = self.backend.scatter
        if len(pools) == 1:
            pools[0] = scatter(pools[0], index, planes)
            return
        for i, rows in enumerate(self.layout.rows_per_pool(planes)):
            pools[i] = scatter(pools[i], index, rows)

    def gather(self, local: int, plane: int, index: Any) -> Any:
        pool, pool_plane = self.layout.sources[plane]
        return self.backend.gather(self.pools[local][pool], pool_plane, index)

    def block_index(self, blocks: np.ndarray) -> Any:
        """The index :meth:`gather_blocks` takes for ``blocks`` (any shape): the block
        ids when the backend gathers whole blocks, else every slot of them."""
        if self._whole_blocks:
            return self.index(blocks)
        bs = self.config.block_size
        return self.index(blocks[..., None] * bs + np.arange(bs, dtype=np.int64))

    def gather_blocks(self, local: int, plane: int, index: Any) -> Any:
        """Whole blocks of one plane, ``blocks.shape + (block_size, heads, dim)``, for an
        index from :meth:`block_index` (a codec's decoded to the compute dtype)."""
        pool, pool_plane = self.layout.sources[plane]
        return self._pool_blocks(self.pools[local][pool], pool_plane, index)

    def _pool_blocks(self, pool: Any, plane: int, index: Any) -> Any:
        if self._whole_blocks:
            return self.backend.gather_blocks(pool, plane, index)
        return self.backend.gather(pool, plane, index)

    def _gather_blocks_codes(self, local: int, plane: int, index: Any) -> Any:
        """:meth:`gather_blocks` of a codec: whole blocks of codes and scales, decoded."""
        pools = self.pools[local]
        pool, pool_plane = self.layout.sources[plane]
        codes = self._pool_blocks(pools[pool], pool_plane, index)
        pool, pool_plane = self.layout.scale_sources[plane]
        scales = self._pool_blocks(pools[pool], pool_plane, index)
        return self.codec.decode(self._ops, codes, scales, self.kv_dtype)  # type: ignore[union-attr]

    def _scatter_codes(self, local: int, index: Any, planes: tuple[Any, ...]) -> None:
        """:meth:`scatter` of a codec: encode every plane once, scatter the codes into
        their pool(s) and the scales into theirs."""
        encode, ops = self.codec.encode, self._ops  # type: ignore[union-attr]
        if len(planes) == 2 and planes[0].shape == planes[1].shape:
            # K and V of one shape: encoded as one array (half the array calls).
            codes, scales = encode(ops, ops.stack(list(planes)))
            encoded = [(codes[0], scales[0]), (codes[1], scales[1])]
        else:
            encoded = [encode(ops, plane) for plane in planes]
        pools = self.pools[local]
        scatter = self.backend.scatter
        rows = self.layout.rows_per_pool(tuple(codes for codes, _ in encoded))
        for i, code_rows in enumerate(rows):
            pools[i] = scatter(pools[i], index, code_rows)
        pools[-1] = scatter(pools[-1], index, [scales for _, scales in encoded])

    def _gather_codes(self, local: int, plane: int, index: Any) -> Any:
        """:meth:`gather` of a codec: the plane's codes and scales, decoded to the
        compute dtype."""
        pools, gather = self.pools[local], self.backend.gather
        pool, pool_plane = self.layout.sources[plane]
        codes = gather(pools[pool], pool_plane, index)
        pool, pool_plane = self.layout.scale_sources[plane]
        scales = gather(pools[pool], pool_plane, index)
        return self.codec.decode(self._ops, codes, scales, self.kv_dtype)  # type: ignore[union-attr]

    def copy_blocks(self, src: np.ndarray, dst: np.ndarray) -> None:
        """Copy whole blocks (every layer, every plane) and their written state."""
        if not src.size:
            return
        self.set_flat_pools(list(self.backend.copy_blocks_layers(
            self.flat_pools(), self.index(src), self.index(dst))))
        self.filled[dst] = self.filled[src]
        self.complete[dst] = self.complete[src]

    def reset_blocks(self, blocks: np.ndarray) -> None:
        """Fresh blocks hold nothing of anyone's: not filled for any layer."""
        if blocks.size:
            self.filled[blocks] = False
            self.complete[blocks] = False

    def mark_filled(self, local: int | np.ndarray, blocks: np.ndarray) -> np.ndarray:
        """Layer ``local`` (one, or an array of local layers) now holds every token of
        ``blocks``; returns the blocks that just became complete (every layer)."""
        if not blocks.size:
            return blocks
        if isinstance(local, np.ndarray):
            self.filled[np.ix_(blocks, local)] = True
        else:
            self.filled[blocks, local] = True
        now = self.filled[blocks].all(axis=1)
        new = blocks[now & ~self.complete[blocks]]
        self.complete[blocks] = now
        return new

    def layer_pools(self, local: int) -> tuple[TensorRef, ...]:
        c = self.config
        return tuple(TensorRef(pool, (spec.planes, self.num_blocks, c.block_size, spec.heads,
                                      spec.dim), spec.dtype, c.device, self.backend)
                     for pool, spec in zip(self.pools[local], self.layout.pools))

    def layer_pool(self, local: int) -> TensorRef:
        if len(self.layout.pools) != 1:
            if self.codec is not None:
                raise UnsupportedError(f"layer {self.layers[local]} of a {self.config.dtype.value} "
                                       "cache keeps its codes and its scales in separate pools; "
                                       "use layer_pools(layer)")
            raise UnsupportedError(f"layer {self.layers[local]} keeps K and V of different "
                                   "widths in two pools; use layer_pools(layer)")
        return self.layer_pools(local)[0]

    def close(self) -> None:
        """Release every pool through the backend; the store is unusable afterwards."""
        if self.closed:
            return
        self.closed = True
        pools, self.pools = self.flat_pools(), []
        release_pools(self.backend, pools)


def allocate_pools(backend: Backend, config: CacheConfig, layout: LayerLayout, layers: int,
                   num_blocks: int, device: Any, *, pinned: bool = False) -> list[list[Any]]:
    """The pools of ``layers`` layers of one layout, zero-filled, all or nothing: if any
    allocation fails, the pools made so far are released and
    :class:`PoolAllocationError` names the bytes."""
    c = config
    made: list[Any] = []
    pools: list[list[Any]] = []
    try:
        for _ in range(layers):
            layer = []
            for spec in layout.pools:
                layer.append(backend.allocate_layer(num_blocks, c.block_size, spec.heads,
                                                    spec.dim, spec.dtype, device, pinned=pinned,
                                                    planes=spec.planes))
                made.append(layer[-1])
            pools.append(layer)
    except BaseException as exc:
        release_pools(backend, made)
        if isinstance(exc, KvCoreError) or not isinstance(exc, (MemoryError, RuntimeError,
                                                                 ValueError, OverflowError)):
            raise
        per_layer = sum(s.planes * s.heads * s.dim * s.dtype.itemsize for s in layout.pools) \
            * c.block_size * num_blocks
        raise PoolAllocationError(f"backend {backend.name!r} could not allocate a pool of "
                                  f"{per_layer} bytes per layer ({layers} layers, "
                                  f"{per_layer * layers} bytes in all) on {device}: "
                                  f"{type(exc).__name__}: {exc}") from exc
    return pools


def release_pools(backend: Backend, pools: list[Any]) -> None:
    for pool in pools:
        backend.release_layer(pool)
