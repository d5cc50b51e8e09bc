"""The backend contract (API version 2): the bulk array operations a backend implements.

Rules for backend authors (and for whoever edits the backends in this repository):

* **Never import an array library until asked.**  A backend's plugin module (the one
  its entry point names) imports only ``kvcore``; the module that imports ``torch`` or
  ``cupy`` is named by :attr:`BackendSpec.load` and imported only when that backend is
  selected.
* **A broken backend must not break the others.**  Import errors, probe failures and
  hook exceptions are caught by the registry and reported against the plugin.
* **Bulk operations only.**  Every method below works on whole index arrays; a backend
  never loops over tokens or blocks in Python.  The manager calls each one a constant
  number of times per layer (or once per step, through the ``*_layers`` forms),
  however large the batch.
* **Operations return the pool.**  Every operation that changes a pool returns the
  pool that now holds the data, and the manager keeps what it gets back.  A library
  with mutable arrays (numpy, torch, cupy) changes the pool in place and returns the
  very same object, at no cost; a library with immutable arrays (JAX) returns a new
  array, ideally made by a jitted function that donates the old buffer.  Either way
  the pool passed in must not be used by the caller afterwards.
* **Never cast silently.**  :meth:`Backend.asarray` hands the array through as it is
  (zero-copy via DLPack where the libraries differ); the manager then checks dtype and
  shape and refuses mismatches with a typed error.

Everything else (block accounting, prefix verification, eviction, copy-on-write
decisions, validation, statistics) lives once in the core and every backend gets it
for free.

Pool layout: one array per layer, shaped ``[planes, num_blocks, block_size,
num_kv_heads, head_dim]``.  A quantized cache (a codec dtype) keeps two per layer: its
codes (``uint8`` or ``int8``, ``[2, ..., heads, head_dim]``) and its scales
(``float32``, ``[2, ..., heads, 1]``); a backend that declares ``uint8`` / ``int8`` in
:attr:`BackendCapabilities.dtypes` allocates and moves them like any pool, and one
that declares codecs in :attr:`BackendCapabilities.codecs` also provides the array
operations the codecs compute with (:meth:`Backend.array_ops`).  A K/V pool has two planes (0 is K, 1 is V).  A *slot* is
``block * block_size + offset``, so viewing a pool as ``[planes, num_blocks *
block_size, num_kv_heads, head_dim]`` makes a slot a plain row index (the layout
vLLM's ``reshape_and_cache`` writes into).

Version history: version 1 mutated pools in place and returned ``None``, had no
``*_layers`` forms, no ``release_layer`` and no ``array_ops``; ``scatter`` took
``key, value`` where version 2 takes a sequence of planes.  The migration is in
``docs/writing-a-backend.md``.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ._codecs import codec_for
from ._device import CODEC_DTYPES, DEVICE_TYPE_RE, FLOAT_DTYPES, Device, DType
from .errors import UnsupportedError

if TYPE_CHECKING:
    from ._array_ops import ArrayOps
    from ._paged_handle import PagedKvCacheHandle

__all__ = ["KVCORE_API_VERSION", "Backend", "BackendCapabilities"]

#: Bumped whenever the :class:`Backend` contract changes incompatibly.  A backend
#: declares the version it was written for; the registry refuses any other.
KVCORE_API_VERSION = 2


def _device_types(value: Sequence[str]) -> tuple[str, ...]:
    types = tuple(value)
    for t in types:
        if not isinstance(t, str) or not DEVICE_TYPE_RE.match(t):
            raise ValueError(f"device type {t!r} is not a lower-case identifier such as "
                             "'cpu', 'cuda', 'mps' or 'tpu'")
    return types


class BackendCapabilities(BaseModel):
    """What a backend promises.  The conformance suite tests every promise, and skips
    (naming the reason) what a backend declares it cannot do."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Device types pools can live on: ``"cpu"``, ``"cuda"``, ``"mps"``, ``"tpu"``...
    device_types: tuple[str, ...] = ("cpu",)
    #: Element types pools and arrays can have: float dtypes (a cache of one holds
    #: K/V as written) and the storage dtypes of codec pools (``uint8``, ``int8``).
    #: Float8 formats are codecs, declared in ``codecs``, never here.
    dtypes: tuple[DType, ...] = (DType.float16, DType.float32)
    #: Dtypes the backend cannot hold, with the reason shown when tests skip them.
    unsupported_dtypes: Mapping[DType, str] = Field(default_factory=dict)
    #: Quantized codecs (``float8_e4m3``, ``float8_e5m2``, ``int8``) a cache on this
    #: backend may use: it holds the codec's storage dtype and ``float32`` (scales),
    #: and its :meth:`Backend.array_ops` computes the codec (``kvcore._codecs``).
    codecs: tuple[DType, ...] = ()
    #: Codecs the backend does not serve, with the reason (shown when refused).
    unsupported_codecs: Mapping[DType, str] = Field(default_factory=dict)
    #: Declared dtypes whose arrays cannot travel through DLPack here, with the
    #: reason (numpy's ``ml_dtypes.bfloat16``: DLPack export and import refuse it).
    no_dlpack_dtypes: Mapping[DType, str] = Field(default_factory=dict)
    #: Device types a pool on this backend can swap blocks out to.
    swap_device_types: tuple[str, ...] = ("cpu",)
    #: Whether arrays the backend returns export DLPack (``__dlpack__``).
    dlpack: bool = True
    #: Whether the backend pins host memory of a swap pool that serves a GPU pool.
    pinned_memory: bool = False
    #: Whether pools change in place (numpy, torch, cupy) or every operation returns a
    #: new array (JAX).  With ``False`` a view taken from ``layer_pool`` is a snapshot.
    mutable_pools: bool = True
    #: Whether ``asarray`` imports a foreign DLPack producer without a copy (sharing its
    #: memory).  ``False`` for a library whose arrays must never change under it (JAX,
    #: with asynchronous dispatch, copies once instead).
    shares_imports: bool = True

    @field_validator("device_types", "swap_device_types", mode="before")
    @classmethod
    def _check_types(cls, value: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            raise ValueError(f"device types must be a sequence of names, got the string "
                             f"{value!r}")
        return _device_types(value)

    @field_validator("dtypes")
    @classmethod
    def _no_codecs_in_dtypes(cls, value: tuple[DType, ...]) -> tuple[DType, ...]:
        for d in value:
            if d in (DType.float8_e4m3, DType.float8_e5m2):
                raise ValueError(f"{d.value} is a codec, not a pool dtype: declare it in "
                                 "codecs (its codes are stored as uint8); dtypes lists "
                                 f"element types of pools ({', '.join(f.value for f in FLOAT_DTYPES)},"
                                 " uint8, int8)")
        return value

    @field_validator("codecs")
    @classmethod
    def _only_codecs(cls, value: tuple[DType, ...]) -> tuple[DType, ...]:
        for d in value:
            if d not in CODEC_DTYPES:
                raise ValueError(f"codecs lists quantized codecs "
                                 f"({', '.join(c.value for c in CODEC_DTYPES)}), not {d.value}")
        return value

    @model_validator(mode="after")
    def _codecs_are_storable(self) -> BackendCapabilities:
        for d in self.codecs:
            codec = codec_for(d)
            needs = [t for t in (codec.code_dtype, codec.scale_dtype) if t not in self.dtypes]
            if needs:
                raise ValueError(f"codec {d.value} is stored as {codec.code_dtype.value} codes "
                                 f"and {codec.scale_dtype.value} scales: declare "
                                 f"{', '.join(t.value for t in needs)} in dtypes too")
        both = set(self.codecs) & set(self.unsupported_codecs)
        if both:
            raise ValueError(f"codecs both served and unsupported: "
                             f"{sorted(d.value for d in both)}")
        return self


class Backend(abc.ABC):
    """Bulk array operations on paged K/V pools, for one array library.

    Subclasses set :attr:`name`, :attr:`array_library` and :attr:`handle_class`, and
    implement the abstract methods.  Instances hold no per-manager state (only caches
    of library objects) and are shared by every manager that uses the backend; the
    manager owns the pools and passes them in.
    """

    #: The name users select the backend by (``kvcore.get_backend(name)``).
    name: ClassVar[str]
    #: The ``import`` name of the array library, checked without importing it.
    array_library: ClassVar[str]
    #: The ``KVCORE_API_VERSION`` this backend was written for, as a literal (``2``):
    #: there is deliberately no default, so a backend written for another contract
    #: is refused instead of silently claiming this one.
    api_version: ClassVar[int]
    #: The handle class the manager hands out for this backend (``as_any`` target).
    handle_class: ClassVar[type[PagedKvCacheHandle]]

    # --- availability -------------------------------------------------------------

    @classmethod
    def probe(cls) -> None:
        """Raise :class:`~kvcore.errors.BackendUnavailableError` if the backend cannot
        run here, with the library's own reason (for example the CUDA runtime's
        error text).  The default accepts."""

    @abc.abstractmethod
    def capabilities(self) -> BackendCapabilities:
        """What this backend can do on this machine."""

    def default_device(self) -> Device:
        """Where pools go when the config does not say (``cpu`` unless overridden)."""
        return Device("cpu")

    def check_device(self, device: Device) -> None:
        """Refuse a device this backend cannot place a pool on."""
        types = self.capabilities().device_types
        if device.type not in types:
            raise UnsupportedError(f"backend {self.name!r} cannot place a pool on device "
                                   f"{str(device)!r}; it supports {', '.join(types)}")

    def check_dtype(self, dtype: DType) -> None:
        """Refuse a dtype this backend cannot hold, with its declared reason."""
        caps = self.capabilities()
        if dtype not in caps.dtypes:
            reason = caps.unsupported_dtypes.get(dtype, "not declared in its capabilities")
            raise UnsupportedError(f"backend {self.name!r} does not support dtype "
                                   f"{dtype.value!r}: {reason}")

    def check_codec(self, dtype: DType) -> None:
        """Refuse a quantized codec this backend does not serve, with its declared
        reason (:class:`~kvcore.errors.UnsupportedError` naming backend and codec)."""
        caps = self.capabilities()
        if dtype not in caps.codecs:
            reason = caps.unsupported_codecs.get(dtype, "not declared in its capabilities "
                                                        "(BackendCapabilities.codecs)")
            raise UnsupportedError(f"backend {self.name!r} does not serve the "
                                   f"{dtype.value!r} codec: {reason}")

    def check_cache_dtypes(self, dtype: DType, compute_dtype: DType) -> None:
        """Refuse a cache of ``dtype`` computing in ``compute_dtype`` (a config's) that
        this backend cannot hold: a float dtype it does not declare, or a codec it does
        not serve (its K/V are written and read in ``compute_dtype``)."""
        if dtype.is_codec:
            self.check_codec(dtype)
            self.check_dtype(compute_dtype)
        else:
            self.check_dtype(dtype)

    # --- pools --------------------------------------------------------------------

    @abc.abstractmethod
    def allocate_layer(self, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int, dtype: DType, device: Device, *,
                       pinned: bool = False, planes: int = 2) -> Any:
        """A zero-filled ``[planes, num_blocks, block_size, num_kv_heads, head_dim]``
        array: every call returns fresh memory, never a pool handed out before.
        ``dtype`` is one the backend declares (a float dtype, or ``uint8`` / ``int8``
        for the codes of a quantized cache).

        ``pinned`` asks for page-locked host memory (a swap pool serving a GPU pool);
        backends without the notion ignore it.  When the memory cannot be had, raise
        :class:`~kvcore.errors.PoolAllocationError` naming the bytes asked for.
        """

    def release_layer(self, pool: Any) -> None:
        """Give back a pool's memory (files, device buffers, pinned pages).  Called once
        per pool by :meth:`KvCacheManager.close`; the pool is never used afterwards.
        The default does nothing (garbage collection frees it)."""

    @abc.abstractmethod
    def index_array(self, indices: np.ndarray, device: Device) -> Any:
        """Turn an ``int64`` numpy array of slot or block ids (any shape) into the index
        type the other methods take, on ``device``.  Called once per batch, reused per
        layer.  The result must not alias ``indices``."""

    @abc.abstractmethod
    def scatter(self, pool: Any, slots: Any, rows: Sequence[Any]) -> Any:
        """Write ``rows[p][i]`` (each ``rows[p]`` is ``[n, heads, dim]``) to slot
        ``slots[i]`` of plane ``p``, for every plane of the pool; return the pool.
        ``slots`` is one-dimensional and holds no duplicates; a later write to a slot
        replaces what was there, bit for bit."""

    @abc.abstractmethod
    def gather(self, pool: Any, plane: int, slots: Any) -> Any:
        """A new array of shape ``slots.shape + (heads, dim)``: element ``i`` is slot
        ``slots[i]`` of plane ``plane`` (0 is K, 1 is V).  It must not alias the pool:
        later writes to the pool do not change it."""

    def gather_blocks(self, pool: Any, plane: int, blocks: Any) -> Any:
        """Optional, for batch reads: a new array of shape ``blocks.shape + (block_size,
        heads, dim)`` holding whole blocks ``blocks[...]`` of plane ``plane`` (``blocks``
        from :meth:`index_array`, any shape, may repeat ids).  It must not alias the
        pool.  A backend that does not override it is read through :meth:`gather` with
        a rectangle of slots (correct, and slower: one index per row, not per block)."""
        raise NotImplementedError

    @abc.abstractmethod
    def copy_blocks(self, pool: Any, src: Any, dst: Any) -> Any:
        """Copy whole blocks ``src[i]`` -> ``dst[i]`` (every plane) within one pool;
        return the pool.  ``dst`` holds no duplicates and no id of ``src``."""

    @abc.abstractmethod
    def transfer_blocks(self, src_pool: Any, src: Any, dst_pool: Any, dst: Any) -> Any:
        """Copy blocks ``src[i]`` of ``src_pool`` to ``dst[i]`` of ``dst_pool`` and return
        ``dst_pool``; the pools may be on different devices (swap).  ``src`` is an index
        on the source device, ``dst`` on the destination device.  Data must arrive
        bit-identical, and be complete for every reader once :meth:`synchronize` on the
        destination device returns."""

    # --- one call per step: all layers at once (optional) ---------------------------

    def scatter_layers(self, pools: Sequence[Any], slots: Any,
                       rows: Sequence[Sequence[Any]]) -> list[Any]:
        """:meth:`scatter` into every pool of ``pools`` (``rows[l]`` for ``pools[l]``)
        with one slot index: a decode step's writes for every layer.  Returns the pools.
        Override to do it in one launch; the default loops over layers."""
        return [self.scatter(pool, slots, r) for pool, r in zip(pools, rows)]

    def copy_blocks_layers(self, pools: Sequence[Any], src: Any, dst: Any) -> list[Any]:
        """:meth:`copy_blocks` in every pool (copy-on-write of a whole step)."""
        return [self.copy_blocks(pool, src, dst) for pool in pools]

    def transfer_blocks_layers(self, src_pools: Sequence[Any], src: Any,
                               dst_pools: Sequence[Any], dst: Any) -> list[Any]:
        """:meth:`transfer_blocks` for every pair of pools (a swap); returns the
        destination pools."""
        return [self.transfer_blocks(s, src, d, dst) for s, d in zip(src_pools, dst_pools)]

    # --- arrays -------------------------------------------------------------------

    @abc.abstractmethod
    def describe(self, array: Any) -> tuple[tuple[int, ...], DType | None, Device]:
        """Shape, dtype (``None`` if not a kvcore dtype) and device of a native array."""

    @abc.abstractmethod
    def asarray(self, obj: Any, device: Device) -> Any:
        """``obj`` as this backend's array type without copying: native arrays pass
        through as the very same object, others go through DLPack and share memory
        (a backend declaring ``shares_imports=False`` copies them once instead).
        Raise :class:`~kvcore.errors.DeviceMismatchError` naming both devices when
        ``obj`` is not on ``device``, :class:`~kvcore.errors.DtypeMismatchError` naming
        the dtype when the library cannot hold it, and ``TypeError`` when it is not an
        array at all or its DLPack export fails (with the reason).  Never change the
        dtype."""

    @abc.abstractmethod
    def to_numpy(self, array: Any) -> np.ndarray:
        """A host copy as numpy (``bfloat16`` widened to ``float32``); never a view that
        a later write to the pool would change."""

    @abc.abstractmethod
    def from_numpy(self, array: np.ndarray, dtype: DType, device: Device) -> Any:
        """A new native array of ``dtype`` on ``device`` holding ``array``'s values."""

    def from_bits(self, bits: np.ndarray, dtype: DType, device: Device) -> Any:
        """A new native array of ``dtype`` on ``device`` whose elements have exactly the
        bit patterns ``bits``: unsigned integers of the dtype's width (``uint16`` for
        ``float16`` and ``bfloat16``, ``uint32`` for ``float32``), any shape.  Loading a
        saved cache uses it, so what comes back is what was saved, bit for bit.

        Optional.  The default goes through :meth:`from_numpy`: exact for ``float16``
        and ``float32``; a ``bfloat16`` element travels widened to ``float32``, exact
        for every value, but a library's float32 -> bfloat16 conversion may
        canonicalise NaN payloads.  A backend holding ``bfloat16`` overrides it to
        reinterpret the bits instead (``kv_torch`` does, with a view)."""
        host = bits_as_host(bits, dtype)
        return self.from_numpy(host, dtype, device)

    def synchronize(self, device: Device) -> None:
        """Wait until every operation this backend queued for ``device`` has finished
        and its results are visible to any reader (GPU backends); a no-op on the CPU."""

    def array_ops(self) -> ArrayOps:
        """The array operations kvcore's generic code (paged attention, codecs) runs
        on this backend's arrays.  The default raises
        :class:`~kvcore.errors.UnsupportedError`; see :mod:`kvcore._array_ops`."""
        raise UnsupportedError(f"backend {self.name!r} provides no array operations "
                               "(Backend.array_ops), so kvcore.attention cannot run on it")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self.name!r}>"


#: The unsigned integer type holding one element's bits, per dtype.
BITS_DTYPES = {DType.float16: np.dtype(np.uint16), DType.bfloat16: np.dtype(np.uint16),
               DType.float32: np.dtype(np.uint32), DType.int8: np.dtype(np.uint8),
               DType.uint8: np.dtype(np.uint8)}


def check_bits(bits: Any, dtype: DType) -> np.ndarray:
    """``bits`` as a C-contiguous numpy array of the dtype's bit type, else a typed error."""
    want = BITS_DTYPES[DType.parse(dtype)]
    if not isinstance(bits, np.ndarray):
        raise TypeError(f"bits must be a numpy array of {want}, got {type(bits).__name__}")
    if bits.dtype != want:
        raise TypeError(f"the bits of a {DType.parse(dtype).value} array are {want}, got an "
                        f"array of {bits.dtype}")
    return np.ascontiguousarray(bits)


def bits_as_host(bits: Any, dtype: DType) -> np.ndarray:
    """The host array :meth:`Backend.from_numpy` takes for ``bits``: a float16 or
    float32 view, or for bfloat16 the float32 whose upper half is the bits (exact)."""
    dtype = DType.parse(dtype)
    bits = check_bits(bits, dtype)
    if dtype is DType.float16:
        return bits.view(np.float16)
    if dtype is DType.float32:
        return bits.view(np.float32)
    if dtype is DType.int8:
        return bits.view(np.int8)
    if dtype is DType.uint8:
        return bits
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
