"""The JAX backend: pools are immutable ``jax.Array``s, every change a donating jit.

Each operation that changes a pool calls one jitted kernel (:mod:`kv_jax._kernels`)
that donates the pool, so XLA updates the old buffer in place and the call returns
the array now holding the data; the manager keeps it (contract v2) and the array
passed in is deleted.  The ``*_layers`` forms are one kernel over the tuple of every
layer's pool: a decode step's writes for all layers are one dispatch.  Indices are
padded to bucket lengths (:mod:`kv_jax._index`) so new batch sizes reuse compiled
kernels.

Views and snapshots.  ``manager.layer_pool(layer).native`` is the pool at that
moment.  After the next write it is a *deleted* array (its buffer went to the write):
using it raises JAX's ``RuntimeError: Array has been deleted``, never stale or
changing data.  A zero-copy view taken from it (``numpy.from_dlpack``,
``torch.from_dlpack``) holds an external reference to the buffer; JAX then declines
the donation, writes into a new buffer (one copy of the pool) and leaves the view's
buffer alone: the view is an unchanging snapshot, valid for as long as it lives.

Reads are synchronous: :meth:`JaxBackend.gather` returns a computed array.  Writes
are asynchronous (JAX dispatch); :meth:`JaxBackend.synchronize` waits for them.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np

from kvcore import Backend, BackendCapabilities, Device, DType
from kvcore._device import CODEC_DTYPES
from kvcore._array_ops import ArrayOps
from kvcore.errors import (ArrayMismatchError, BackendUnavailableError, DeviceMismatchError,
                           DtypeMismatchError, PoolAllocationError, ShapeMismatchError,
                           UnsupportedError)

from ._array_ops import JaxOps
from ._convert import JAX_DTYPES, from_jax_dtype, host_view, import_array, narrow, to_host
from ._devices import CPU as _CPU
from ._devices import cpu_device, device_of
from ._handle import JaxKvCacheHandle
from ._index import MAX_SLOTS, JaxIndex, pad_rows
from ._kernels import Kernels, default_kernels
from ._selfcheck import bit_exact_problems

__all__ = ["JaxBackend"]

_Tracer = jax.core.Tracer


def _array_type() -> type | None:
    """The concrete array type (``jaxlib``'s ArrayImpl), for an exact-type fast path;
    made on the CPU device so that importing this module never starts a GPU."""
    try:
        return type(jax.device_put(np.zeros(0, np.float32), cpu_device()))
    except Exception:  # noqa: BLE001 - no CPU device: probe() reports JAX's reason
        return None


_ArrayImpl = _array_type()
_ALL_DTYPES = (DType.float16, DType.bfloat16, DType.float32)
#: Why the quantized codecs are not served (docs/quantized-kv.md).
_NO_CODECS = ("not implemented for jax yet: its pools hold float dtypes only (no uint8 / "
              "int8 code pools), and XLA's CPU arithmetic was not shown to reproduce the "
              "codecs' IEEE float32 results (eager jax.numpy gave scales an ulp apart)")
#: Dtypes proven bit-exact at start-up.  bfloat16 only: its exactness rests on the
#: kernels' compiler option (kv_jax._kernels); XLA moves float16 and float32
#: natively, which the test suite checks with every bit pattern.  (Each dtype checked
#: costs about five compilations, a second on a busy 2-core machine.)
_CHECKED_DTYPES = (DType.bfloat16,)
#: Weak references kept for :meth:`JaxBackend.synchronize` before finished ones are
#: pruned.
_PRUNE_AT = 256


class _Outstanding:
    """Weak references to the arrays the pool-changing operations returned.

    JAX has no "wait for this device" call; waiting for the newest array of every
    chain of writes covers its predecessors (each write reads the pool before it).
    Weak, so a pool the caller dropped is not kept alive here.
    """

    def __init__(self) -> None:
        self._refs: list[weakref.ref[Any]] = []
        self._lock = threading.Lock()

    def add(self, arrays: Iterable[Any]) -> None:
        with self._lock:
            self._refs.extend(weakref.ref(a) for a in arrays)
            if len(self._refs) > _PRUNE_AT:
                self._refs = [r for r in self._refs if _unfinished(r())]

    def wait(self) -> None:
        with self._lock:
            refs, self._refs = self._refs, []
        for ref in refs:
            array = ref()
            if array is None or array.is_deleted():
                continue  # dropped, or donated to a later write that is tracked
            try:
                array.block_until_ready()
            except RuntimeError:
                if not array.is_deleted():  # a real failure, not a donation race
                    raise


def _unfinished(array: Any) -> bool:
    return array is not None and not array.is_deleted() and not array.is_ready()


class JaxBackend(Backend):
    """Paged K/V pools as immutable ``jax.Array``s on JAX's CPU device."""

    name = "jax"
    array_library = "jax"
    api_version = 2
    handle_class = JaxKvCacheHandle

    def __init__(self, kernels: Kernels | None = None) -> None:
        """``kernels`` replace the process-wide compiled kernels (tests)."""
        self._k = kernels if kernels is not None else default_kernels()
        self._caps: BackendCapabilities | None = None
        self._caps_lock = threading.Lock()
        self._outstanding = _Outstanding()

    # --- availability -------------------------------------------------------------

    @classmethod
    def probe(cls) -> None:
        """Refuse when JAX has no CPU device here, in JAX's words (for example
        ``JAX_PLATFORMS`` naming only an accelerator)."""
        try:
            cpu_device()
        except Exception as exc:  # noqa: BLE001 - RuntimeError, ValueError...: the reason
            # JAX_PLATFORMS naming only a platform without its plugin fails inside JAX
            # with a bare AssertionError: name the setting, the usual cause.
            platforms = jax.config.jax_platforms
            hint = f" (JAX_PLATFORMS={platforms!r} must include 'cpu')" if platforms else ""
            raise BackendUnavailableError(f"jax {jax.__version__} has no usable CPU device: "
                                          f"{type(exc).__name__}: {exc}{hint}") from exc

    def capabilities(self) -> BackendCapabilities:
        """Declares bfloat16 only if its compiled kernels proved bit-exact on this
        machine (:func:`kv_jax._selfcheck.bit_exact_problems`, run once per instance)."""
        with self._caps_lock:
            if self._caps is None:
                problems = bit_exact_problems(self, _CHECKED_DTYPES)
                self._caps = BackendCapabilities(
                    device_types=("cpu",),
                    dtypes=tuple(d for d in _ALL_DTYPES if d not in problems),
                    unsupported_dtypes=problems,
                    unsupported_codecs={d: _NO_CODECS for d in CODEC_DTYPES},
                    swap_device_types=("cpu",),
                    dlpack=True,
                    pinned_memory=False,
                    mutable_pools=False,
                    shares_imports=False,  # foreign buffers are copied: see asarray
                )
            return self._caps

    def check_device(self, device: Device) -> None:
        """Accept the cpu only (decided without :meth:`capabilities`, which runs the
        self-check through the operations that call this)."""
        if device.type != "cpu":
            raise UnsupportedError(f"backend 'jax' cannot place a pool on device "
                                   f"{str(device)!r}; it supports cpu (JAX's CPU device)")

    # --- pools --------------------------------------------------------------------

    def allocate_layer(self, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int, dtype: DType, device: Device, *,
                       pinned: bool = False, planes: int = 2) -> jax.Array:
        """A zero-filled pool XLA owns (so it can be donated); ``pinned`` is ignored
        (host memory is the device memory here)."""
        self.check_device(device)
        self.check_dtype(dtype)
        return self._zeros((planes, num_blocks, block_size, num_kv_heads, head_dim), dtype)

    def _zeros(self, shape: tuple[int, ...], dtype: DType) -> jax.Array:
        slots = shape[1] * shape[2]
        if slots >= MAX_SLOTS:
            raise UnsupportedError(f"backend 'jax' indexes slots with int32: a pool of {slots} "
                                   f"slots ({shape[1]} blocks of {shape[2]}) exceeds "
                                   f"{MAX_SLOTS - 1}")
        try:
            pool = self._k.zeros(tuple(int(s) for s in shape), JAX_DTYPES[dtype])
            # Allocation is asynchronous: surface an out-of-memory here, not later.
            return pool.block_until_ready()
        except (MemoryError, RuntimeError, ValueError) as exc:  # XlaRuntimeError: RuntimeError
            nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
            raise PoolAllocationError(f"jax could not allocate a pool of {nbytes} bytes "
                                      f"(shape {list(shape)}, {dtype.value}): {exc}") from exc

    def release_layer(self, pool: Any) -> None:
        """Delete the pool's buffer now.  A DLPack view someone still holds keeps its
        memory (and stays readable) until it dies; JAX counts those references."""
        if isinstance(pool, jax.Array) and not pool.is_deleted():
            pool.delete()

    def index_array(self, indices: np.ndarray, device: Device) -> JaxIndex:
        self.check_device(device)
        return JaxIndex(indices)

    # --- operations ---------------------------------------------------------------

    def scatter(self, pool: jax.Array, slots: JaxIndex, rows: Sequence[Any]) -> jax.Array:
        pool = _live_pool(pool, "scatter")
        idx = _flat_index(slots, "scatter")
        prepared = self._planes(pool, idx, rows)
        if idx.size == 0:
            return pool
        out = self._k.scatter(pool, idx.device, prepared)
        self._outstanding.add((out,))
        return out

    def scatter_layers(self, pools: Sequence[jax.Array], slots: JaxIndex,
                       rows: Sequence[Sequence[Any]]) -> list[jax.Array]:
        """Every layer's writes of a step in one kernel (one dispatch)."""
        pools = tuple(_live_pool(p, "scatter_layers") for p in pools)
        if len(rows) != len(pools):
            raise ShapeMismatchError(f"scatter_layers got rows for {len(rows)} layers and "
                                     f"{len(pools)} pools")
        idx = _flat_index(slots, "scatter_layers")
        prepared = tuple(self._planes(p, idx, r) for p, r in zip(pools, rows))
        if idx.size == 0 or not pools:
            return list(pools)
        out = self._k.scatter_layers(pools, idx.device, prepared)
        self._outstanding.add(out)
        return list(out)

    def gather(self, pool: jax.Array, plane: int, slots: JaxIndex) -> jax.Array:
        pool = _live_pool(pool, "gather")
        idx = _index(slots, "gather")
        if isinstance(plane, bool) or not isinstance(plane, (int, np.integer)) \
                or not 0 <= plane < pool.shape[0]:
            raise IndexError(f"gather: plane {plane!r} is not one of the pool's "
                             f"{pool.shape[0]} planes")
        idx.check_bound(pool.shape[1] * pool.shape[2], "slot")
        tail = tuple(pool.shape[3:])
        if idx.size == 0:
            return jax.device_put(np.zeros(idx.shape + tail, pool.dtype), cpu_device())
        out = self._k.gather(pool, int(plane), idx.device)
        if idx.size == idx.bucket and len(idx.shape) == 1:
            return out.block_until_ready()
        # Drop the padding without compiling a slice for this length: a view of the
        # first rows, put back as a jax array (zero-copy where aligned).  The view is
        # of the gather's own output, which nothing else holds.
        view = host_view(out)[:idx.size].reshape(idx.shape + tail)
        return jax.device_put(view, cpu_device())

    def copy_blocks(self, pool: jax.Array, src: JaxIndex, dst: JaxIndex) -> jax.Array:
        pool = _live_pool(pool, "copy_blocks")
        s, d = _block_pair(src, dst, pool, pool, "copy_blocks")
        if s.size == 0:
            return pool
        out = self._k.copy_blocks(pool, s.device, d.device)
        self._outstanding.add((out,))
        return out

    def copy_blocks_layers(self, pools: Sequence[jax.Array], src: JaxIndex,
                           dst: JaxIndex) -> list[jax.Array]:
        pools = tuple(_live_pool(p, "copy_blocks_layers") for p in pools)
        if not pools:
            return []
        for pool in pools:
            s, d = _block_pair(src, dst, pool, pool, "copy_blocks_layers")
        if s.size == 0:
            return list(pools)
        out = self._k.copy_blocks_layers(pools, s.device, d.device)
        self._outstanding.add(out)
        return list(out)

    def transfer_blocks(self, src_pool: jax.Array, src: JaxIndex, dst_pool: jax.Array,
                        dst: JaxIndex) -> jax.Array:
        src_pool = _live_pool(src_pool, "transfer_blocks")
        dst_pool = _live_pool(dst_pool, "transfer_blocks")
        if src_pool is dst_pool:  # donating an array that is also read: a copy
            return self.copy_blocks(dst_pool, src, dst)
        s, d = _block_pair(src, dst, src_pool, dst_pool, "transfer_blocks")
        if s.size == 0:
            return dst_pool
        out = self._k.transfer_blocks(src_pool, s.device, dst_pool, d.device)
        self._outstanding.add((out,))
        return out

    def transfer_blocks_layers(self, src_pools: Sequence[jax.Array], src: JaxIndex,
                               dst_pools: Sequence[jax.Array],
                               dst: JaxIndex) -> list[jax.Array]:
        srcs = tuple(_live_pool(p, "transfer_blocks_layers") for p in src_pools)
        dsts = tuple(_live_pool(p, "transfer_blocks_layers") for p in dst_pools)
        if len(srcs) != len(dsts):
            raise ShapeMismatchError(f"transfer_blocks_layers got {len(srcs)} source and "
                                     f"{len(dsts)} destination pools")
        if any(a is b for a in srcs for b in dsts):
            return [self.transfer_blocks(a, src, b, dst) for a, b in zip(srcs, dsts)]
        if not dsts:
            return []
        for a, b in zip(srcs, dsts):
            s, d = _block_pair(src, dst, a, b, "transfer_blocks_layers")
        if s.size == 0:
            return list(dsts)
        out = self._k.transfer_blocks_layers(srcs, s.device, dsts, d.device)
        self._outstanding.add(out)
        return list(out)

    def _planes(self, pool: jax.Array, idx: JaxIndex, rows: Sequence[Any]) -> tuple[Any, ...]:
        """``rows`` checked against ``pool`` and padded to the index's bucket."""
        if len(rows) != pool.shape[0]:
            raise ShapeMismatchError(f"got rows for {len(rows)} planes, the pool has "
                                     f"{pool.shape[0]}")
        idx.check_bound(pool.shape[1] * pool.shape[2], "slot")
        want = (idx.size,) + pool.shape[3:]
        out = []
        for plane, r in enumerate(rows):
            r = self.asarray(r, _CPU)
            if r.shape != want:
                raise ShapeMismatchError(f"rows of plane {plane} have shape {list(r.shape)}, "
                                         f"expected {list(want)}")
            if r.dtype != pool.dtype:
                raise DtypeMismatchError(f"rows of plane {plane} have dtype {r.dtype}, the pool "
                                         f"holds {pool.dtype}; kvcore does not cast")
            out.append(r if idx.size == idx.bucket else pad_rows(r, idx.bucket))
        return tuple(out)

    def synchronize(self, device: Device) -> None:
        """Wait until every write queued so far has finished."""
        self._outstanding.wait()

    # --- arrays -------------------------------------------------------------------

    def describe(self, array: Any) -> tuple[tuple[int, ...], DType | None, Device]:
        if not _concrete(array):
            raise TypeError(f"expected a concrete jax.Array, got {type(array).__name__}")
        return tuple(array.shape), from_jax_dtype(array.dtype), device_of(array)

    def asarray(self, obj: Any, device: Device) -> jax.Array:
        """``obj`` as a jax array on ``device``: jax arrays pass through as the very
        same object; numpy arrays and other DLPack producers on the CPU are copied
        once into a JAX-owned buffer (:mod:`kv_jax._convert` says why)."""
        if type(obj) is not _ArrayImpl and isinstance(obj, _Tracer):
            raise TypeError("got a traced value (inside jax.jit, vmap or grad): the cache "
                            "stores concrete arrays, write it outside the traced function")
        if type(obj) is _ArrayImpl or isinstance(obj, jax.Array):
            if obj.is_deleted():
                raise TypeError("the jax.Array was deleted (donated to a jitted call or "
                                ".delete()d): it holds no data any more")
            where = device_of(obj)
            if where is not device and where != device:
                raise DeviceMismatchError(f"jax array is on {where}, the cache is on {device}; "
                                          "move it first with jax.device_put")
            return obj
        if device.type != "cpu":
            raise DeviceMismatchError(f"the jax backend serves the cpu only, not {device}")
        return import_array(obj, device)

    def to_numpy(self, array: Any) -> np.ndarray:
        """A host copy (bfloat16 widened to float32 exactly)."""
        if not _concrete(array):
            raise TypeError(f"expected a jax.Array, got {type(array).__name__}")
        if array.is_deleted():
            raise ArrayMismatchError("to_numpy: the jax.Array was deleted (a pool is deleted "
                                     "once a later write donates it; take layer_pool again)")
        return to_host(array)

    def from_numpy(self, array: np.ndarray, dtype: DType, device: Device) -> jax.Array:
        self.check_device(device)
        self.check_dtype(dtype)
        return jax.device_put(narrow(np.asarray(array), dtype), cpu_device())

    def array_ops(self) -> ArrayOps:
        return _OPS


_OPS = JaxOps()


def _concrete(obj: Any) -> bool:
    """Whether ``obj`` is a concrete jax array (not a tracer); the common case first."""
    return type(obj) is _ArrayImpl or (isinstance(obj, jax.Array)
                                       and not isinstance(obj, _Tracer))


def _live_pool(pool: Any, op: str) -> jax.Array:
    if not _concrete(pool):
        raise TypeError(f"{op}: expected a pool (jax.Array), got {type(pool).__name__}")
    if pool.is_deleted():
        raise ArrayMismatchError(f"{op}: the pool was deleted: an earlier operation donated "
                                 "its buffer; pass the pool that operation returned")
    if pool.ndim != 5:
        raise ShapeMismatchError(f"{op}: a pool is [planes, blocks, block_size, heads, dim], "
                                 f"got shape {list(pool.shape)}")
    return pool


def _index(index: Any, op: str) -> JaxIndex:
    if not isinstance(index, JaxIndex):
        raise TypeError(f"{op}: expected an index from JaxBackend.index_array, got "
                        f"{type(index).__name__}")
    return index


def _flat_index(index: Any, op: str) -> JaxIndex:
    index = _index(index, op)
    if len(index.shape) != 1:
        raise ShapeMismatchError(f"{op}: the index must be one-dimensional, got shape "
                                 f"{list(index.shape)}")
    return index


def _block_pair(src: Any, dst: Any, src_pool: jax.Array, dst_pool: jax.Array,
                op: str) -> tuple[JaxIndex, JaxIndex]:
    """Check block indices and pools of a block copy; the pools must agree on
    everything but their number of blocks (no silent cast, no reshaping)."""
    s, d = _flat_index(src, op), _flat_index(dst, op)
    if s.size != d.size:
        raise ShapeMismatchError(f"{op}: {s.size} source blocks but {d.size} destinations")
    if src_pool.dtype != dst_pool.dtype:
        raise DtypeMismatchError(f"{op}: source pool holds {src_pool.dtype}, destination "
                                 f"{dst_pool.dtype}; kvcore does not cast")
    if (src_pool.shape[0],) + src_pool.shape[2:] != (dst_pool.shape[0],) + dst_pool.shape[2:]:
        raise ShapeMismatchError(f"{op}: pools of shape {list(src_pool.shape)} and "
                                 f"{list(dst_pool.shape)} differ beyond their block count")
    s.check_bound(src_pool.shape[1], "block")
    d.check_bound(dst_pool.shape[1], "block")
    return s, d
