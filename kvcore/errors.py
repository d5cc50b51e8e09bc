"""Every exception kvcore raises on purpose.

All of them derive from :class:`KvCoreError`, so ``except kvcore.errors.KvCoreError``
catches everything the library signals.  Where a built-in exception carries the same
meaning (``IndexError`` for a layer out of range, ``ValueError`` for a bad argument,
``TypeError`` for a wrong type) the kvcore error subclasses it too, so code written
against plain Python conventions keeps working.

Every message names the offending value and what was expected.  An operation that
raises one of these leaves the cache exactly as it was.
"""

from __future__ import annotations

__all__ = [
    "KvCoreError",
    "BackendError",
    "UnknownBackendError",
    "BackendUnavailableError",
    "PluginLoadError",
    "DuplicateBackendError",
    "ApiVersionError",
    "CacheError",
    "OutOfBlocksError",
    "PoolAllocationError",
    "InvalidHandleError",
    "HandleSwappedError",
    "UnknownRequestError",
    "DuplicateRequestError",
    "LayerIndexError",
    "CapacityError",
    "ArrayMismatchError",
    "ShapeMismatchError",
    "DtypeMismatchError",
    "DeviceMismatchError",
    "UnsupportedError",
    "WriteOrderError",
    "StaleSlotMappingError",
    "InvariantError",
    "ManagerClosedError",
    "PendingPrefixError",
    "NotCopyableError",
    "LayoutMismatchError",
    "CacheFileError",
    "StoreError",
    "UnknownStoreError",
    "DuplicateStoreError",
    "StoreUnavailableError",
    "StoreConfigError",
    "StoreKeyError",
    "StoreClosedError",
    "StoreConnectionError",
    "StoreTimeoutError",
    "StorePartialError",
    "BlockFormatError",
    "CorruptBlockError",
    "ForeignBlockError",
    "BlockKeyError",
]


class KvCoreError(Exception):
    """Base class of every error kvcore raises on purpose."""


# --- backends and plugins --------------------------------------------------------


class BackendError(KvCoreError):
    """Something is wrong with finding, loading or using a backend."""


class UnknownBackendError(BackendError, LookupError):
    """No installed backend has the requested name."""


class BackendUnavailableError(BackendError):
    """The backend is installed but cannot run here (missing library, no GPU, ...)."""


class PluginLoadError(BackendError):
    """A plugin's entry point failed to import, or one of its hooks raised.

    Only raised when ``KVCORE_STRICT_PLUGINS=1``; otherwise the failure is reported by
    :func:`kvcore.list_backends` and the other plugins keep working.
    """


class DuplicateBackendError(BackendError):
    """Two distributions declare a backend with the same name."""


class ApiVersionError(BackendUnavailableError):
    """A backend was built for a different ``KVCORE_API_VERSION``."""


class UnsupportedError(BackendError, NotImplementedError):
    """The backend does not support the requested dtype, device or operation."""


# --- the cache ------------------------------------------------------------------


class CacheError(KvCoreError):
    """A cache operation was refused."""


class OutOfBlocksError(CacheError, MemoryError):
    """The block pool cannot hold the request; nothing was allocated."""


class InvalidHandleError(CacheError):
    """The handle was deallocated (or never belonged to this manager)."""


class HandleSwappedError(CacheError):
    """The handle's blocks are swapped out; ``swap_in`` it before touching its data."""


class UnknownRequestError(CacheError, KeyError):
    """No live cache has this request id."""

    def __str__(self) -> str:  # KeyError would repr() the message; keep it readable
        return str(self.args[0]) if self.args else ""


class DuplicateRequestError(CacheError, ValueError):
    """A live cache already has this request id."""


class LayerIndexError(CacheError, IndexError):
    """A layer index outside ``0 <= layer < num_layers``."""


class CapacityError(CacheError, ValueError):
    """A block table was asked to hold more tokens than its blocks have room for."""


class WriteOrderError(CacheError, ValueError):
    """A write would leave a gap of unwritten tokens before it."""


class ArrayMismatchError(CacheError, ValueError):
    """An array given to the cache does not match what the cache holds."""


class ShapeMismatchError(ArrayMismatchError):
    """An array has the wrong shape."""


class DtypeMismatchError(ArrayMismatchError, TypeError):
    """An array has the wrong dtype; kvcore never casts silently."""


class DeviceMismatchError(ArrayMismatchError):
    """An array lives on a different device than the cache."""


class StaleSlotMappingError(CacheError):
    """A slot mapping was made before blocks moved (fork, copy-on-write, swap or
    deallocation); make a new one with ``extend``."""


class InvariantError(CacheError, AssertionError):
    """:meth:`KvCacheManager.check_invariants` found the pool inconsistent (a bug)."""


class PoolAllocationError(CacheError, MemoryError):
    """A backend could not allocate a pool of the requested size (the message names
    the bytes asked for); nothing was created."""


class ManagerClosedError(CacheError):
    """The manager was closed (:meth:`KvCacheManager.close`); its pools are released
    and every handle is invalid."""


class PendingPrefixError(CacheError):
    """A sequence shares prefix blocks whose prefill (by another sequence) has not
    yet written the layer being read."""


class NotCopyableError(CacheError, TypeError):
    """The object refers to live cache state and cannot be copied or pickled; the
    message names what to use instead (fork, save)."""


class LayoutMismatchError(CacheError, ValueError):
    """A saved cache holds K/V of another shape (layers, KV heads, head size or dtype)
    than the manager asked to load it; the message names both layouts."""


class CacheFileError(CacheError, ValueError):
    """A file given to :meth:`KvCacheManager.load` is not a readable kvcore cache file:
    not safetensors, truncated, corrupt, written by something else, or of a format
    version this kvcore does not read.  Nothing was loaded."""


# --- stores (sharing blocks beyond one process) ------------------------------------


class StoreError(KvCoreError):
    """Something is wrong with finding, opening or using a KV block store."""


class UnknownStoreError(StoreError, LookupError):
    """No installed store plugin has the requested name or URL scheme."""


class DuplicateStoreError(StoreError, ValueError):
    """A store name is registered twice in code."""


class StoreUnavailableError(StoreError):
    """The store plugin is installed but cannot run here (missing library, wrong API
    version, broken plugin), or a connector refused a call while its circuit is open."""


class StoreConfigError(StoreError, ValueError):
    """A store URL, a store option or a connector setting is malformed or unknown."""


class StoreKeyError(StoreError, ValueError):
    """A store key is not 1..200 characters of ``[A-Za-z0-9._-]``, or a block digest
    has the wrong type or length."""


class StoreClosedError(StoreError):
    """The store or connector was closed; open a new one."""


class StoreConnectionError(StoreError, ConnectionError):
    """The store's server or directory failed an operation: unreachable, refused,
    an I/O error.  The connector counts these and treats them as misses."""


class StoreTimeoutError(StoreConnectionError, TimeoutError):
    """The store did not answer within its timeout."""


class StorePartialError(StoreConnectionError):
    """Part of a batch failed (a Redis Cluster node is down): ``results`` holds what
    did succeed (``None`` where a key failed), ``failed`` the keys that failed."""

    def __init__(self, message: str, results: list | None = None,
                 failed: list[str] | None = None) -> None:
        super().__init__(message)
        self.results = results if results is not None else []
        self.failed = failed if failed is not None else []


class BlockFormatError(StoreError, ValueError):
    """A stored block value cannot be used (base of the two below)."""


class CorruptBlockError(BlockFormatError):
    """A stored value is damaged: bad magic, unknown format version, truncated,
    sizes that do not add up, or a checksum / MAC that does not match."""


class ForeignBlockError(BlockFormatError):
    """A stored value is intact but not ours: another layout fingerprint, another
    block key, or array shapes / dtypes other than the ones expected."""


class BlockKeyError(StoreError, ValueError, TypeError):
    """Bad input to the chain-key function: token ids that are not integers in
    ``0 <= id < 2**31`` in a ``[n, block_size]`` array, a parent digest or
    ``hash_key`` of the wrong type or length."""
