"""The backend contract: the bulk array operations a backend implements.

Rules for backend authors (and for whoever edits the backends in this repository):

* **Never import an array library until asked.**  A backend's plugin module (the one
  its entry point names) imports only ``kvcore``; the module that imports ``torch`` or
  ``cupy`` is named by :attr:`BackendSpec.load` and imported only when that backend is
  selected.
* **A broken backend must not break the others.**  Import errors, probe failures and
  hook exceptions are caught by the registry and reported against the plugin.
* **Bulk operations only.**  Every method below works on whole index arrays; a backend
  never loops over tokens or blocks in Python.  The manager calls each one a constant
  number of times per layer, however large the batch.
* **Never cast silently.**  :meth:`Backend.asarray` hands the array through as it is
  (zero-copy via DLPack where the libraries differ); the manager then checks dtype and
  shape and refuses mismatches with a typed error.

Everything else (block accounting, prefix hashing, eviction, copy-on-write decisions,
validation, statistics) lives once in the core and every backend gets it for free.

Pool layout: one array per layer, shaped ``[2, num_blocks, block_size, num_kv_heads,
head_dim]`` (index 0 is K, 1 is V).  A *slot* is ``block * block_size + offset``, so
viewing a layer as ``[2, num_blocks * block_size, num_kv_heads, head_dim]`` makes a
slot a plain row index (the layout vLLM's ``reshape_and_cache`` writes into).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ._device import Device, DType
from .errors import UnsupportedError

if TYPE_CHECKING:
    from ._paged_handle import PagedKvCacheHandle

__all__ = ["KVCORE_API_VERSION", "Backend", "BackendCapabilities"]

#: Bumped whenever the :class:`Backend` contract changes incompatibly.  A backend
#: declares the version it was written for; the registry refuses any other.
KVCORE_API_VERSION = 1


class BackendCapabilities(BaseModel):
    """What a backend promises.  The conformance suite tests every promise, and skips
    (naming the reason) what a backend declares it cannot do."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Device types pools can live on: ``"cpu"``, ``"cuda"``.
    device_types: tuple[str, ...] = ("cpu",)
    dtypes: tuple[DType, ...] = (DType.float16, DType.float32)
    #: Dtypes the backend cannot hold, with the reason shown when tests skip them.
    unsupported_dtypes: Mapping[DType, str] = Field(default_factory=dict)
    #: Device types a pool on this backend can swap blocks out to.
    swap_device_types: tuple[str, ...] = ("cpu",)
    #: Whether arrays the backend returns export DLPack (``__dlpack__``).
    dlpack: bool = True
    #: Whether the backend pins host memory of a swap pool that serves a GPU pool.
    pinned_memory: bool = False


class Backend(abc.ABC):
    """Bulk array operations on paged K/V pools, for one array library.

    Subclasses set :attr:`name`, :attr:`array_library` and :attr:`handle_class`, and
    implement the abstract methods.  Instances are stateless apart from caches of
    library objects, and are shared by every manager that uses the backend.
    """

    #: The name users select the backend by (``kvcore.get_backend(name)``).
    name: ClassVar[str]
    #: The ``import`` name of the array library, checked without importing it.
    array_library: ClassVar[str]
    #: The ``KVCORE_API_VERSION`` this backend was written for.
    api_version: ClassVar[int] = KVCORE_API_VERSION
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

    # --- pools --------------------------------------------------------------------

    @abc.abstractmethod
    def allocate_layer(self, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int, dtype: DType, device: Device, *,
                       pinned: bool = False) -> Any:
        """A zero-filled ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` array.

        ``pinned`` asks for page-locked host memory (a swap pool serving a GPU pool);
        backends without the notion ignore it.
        """

    @abc.abstractmethod
    def index_array(self, indices: np.ndarray, device: Device) -> Any:
        """Turn an ``int64`` numpy array of slot or block ids into the index type the
        other methods take, on ``device``.  Called once per batch, reused per layer."""

    @abc.abstractmethod
    def scatter(self, layer: Any, slots: Any, key: Any, value: Any) -> None:
        """Write ``key[i]`` and ``value[i]`` (each ``[n, heads, dim]``) to slot
        ``slots[i]`` of ``layer``.  ``slots`` holds no duplicates."""

    @abc.abstractmethod
    def gather(self, layer: Any, kv: int, slots: Any) -> Any:
        """A new ``[n, heads, dim]`` array: row ``i`` is slot ``slots[i]`` of K
        (``kv=0``) or V (``kv=1``)."""

    @abc.abstractmethod
    def copy_blocks(self, layer: Any, src: Any, dst: Any) -> None:
        """Copy whole blocks ``src[i]`` -> ``dst[i]`` (K and V) within one layer."""

    @abc.abstractmethod
    def transfer_blocks(self, src_layer: Any, src: Any, dst_layer: Any, dst: Any) -> None:
        """Copy blocks ``src[i]`` of ``src_layer`` to ``dst[i]`` of ``dst_layer``; the two
        layers may be on different devices (swap).  ``src`` is an index on the source
        device, ``dst`` on the destination device.  Data must arrive bit-identical."""

    # --- arrays -------------------------------------------------------------------

    @abc.abstractmethod
    def describe(self, array: Any) -> tuple[tuple[int, ...], DType | None, Device]:
        """Shape, dtype (``None`` if not a kvcore dtype) and device of a native array."""

    @abc.abstractmethod
    def asarray(self, obj: Any, device: Device) -> Any:
        """``obj`` as this backend's array type without copying: native arrays pass
        through, others go through DLPack.  Raise
        :class:`~kvcore.errors.DeviceMismatchError` naming both devices when ``obj``
        is not on ``device``, and ``TypeError`` when it is not an array at all.  Never
        change the dtype."""

    @abc.abstractmethod
    def to_numpy(self, array: Any) -> np.ndarray:
        """A host copy as numpy (``bfloat16`` widened to ``float32``); for tests."""

    @abc.abstractmethod
    def from_numpy(self, array: np.ndarray, dtype: DType, device: Device) -> Any:
        """A native array of ``dtype`` on ``device`` holding ``array``'s values."""

    def synchronize(self, device: Device) -> None:
        """Wait for queued work on ``device`` (GPU backends); a no-op on the CPU."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self.name!r}>"
