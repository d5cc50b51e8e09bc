"""The store contract: what a place that keeps blocks beyond one process must do.

A :class:`Store` is a batch key/value store of opaque bytes.  It knows nothing about
K/V, layouts or chain keys: :class:`~kvcore.stores.StoreConnector` builds the keys
(:class:`~kvcore.stores.StoreNamespace`) and the values (:func:`encode_block`) and
checks what comes back.  That keeps a store plugin small (Redis, a directory, S3,
Mooncake, LMCache's remote tier are each a few calls) and keeps every correctness
check in one place, in the core.

Rules every implementation keeps (the conformance suite's store section checks them):

* **Batches.**  Each method takes a batch and should cost one round trip to the
  server per batch (pipelining, MGET, parallel requests), not one per key.
* **Keys** are 1..200 characters of ``[A-Za-z0-9._-]`` (:func:`check_keys`), safe as
  Redis keys, file names and object names.  **Values** are bytes of any length; a
  value read back is exactly the bytes last written under its key, or ``None``.
* **Thread safety.**  One instance is called from several threads at once (the
  connector's write-behind thread puts while the engine's thread gets).  Either make
  every method safe for that or hold a lock.
* **Timeouts.**  No call blocks longer than the store's timeout (``timeout`` URL
  option, seconds; a short default, 0.5 s for network stores) per network operation:
  a dead or stopped server raises :class:`~kvcore.errors.StoreTimeoutError` /
  :class:`~kvcore.errors.StoreConnectionError` soon, never hangs.
* **Errors** are kvcore's: :class:`~kvcore.errors.StoreConnectionError` (and its
  subclasses) for anything the server or disk did, with the store's redacted URL in
  the message; :class:`~kvcore.errors.StorePartialError` when part of a batch failed
  and the rest is good (a Redis Cluster node is down), carrying the partial results.
  A library's own exception never escapes.
* **Secrets** never appear in :attr:`url`, ``repr`` or messages.
* **close()** is idempotent; after it every call raises
  :class:`~kvcore.errors.StoreClosedError`.  A store is a context manager.
"""

from __future__ import annotations

import abc
import re
import threading
from collections.abc import Sequence
from typing import Any, ClassVar, Union

from ..errors import StoreClosedError, StoreKeyError

__all__ = ["STORE_API_VERSION", "Store", "Value", "ValueParts", "check_items", "check_keys"]

#: The version of this contract; a plugin's StoreSpec and Store class declare it.
STORE_API_VERSION = 1
_KEY_RE = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


class ValueParts:
    """One value as consecutive buffers: a block's header and its arrays' own memory.

    A store that can send scattered buffers (``os.writev``, a socket) declares
    ``accepts_parts = True`` and writes the parts as they are: a block then goes from
    the arrays the engine offered to the wire or the file without being copied into
    one ``bytes`` first (that copy, into fresh memory, costs more than the network on
    a fast link).  Every other store receives ``bytes`` (:meth:`tobytes`): ``Store.put``
    converts for it.  ``len()`` is the value's length in bytes.
    """

    __slots__ = ("parts", "nbytes")

    def __init__(self, parts: Sequence[memoryview]) -> None:
        self.parts = tuple(memoryview(p).cast("B") for p in parts)
        self.nbytes = sum(len(p) for p in self.parts)

    def __len__(self) -> int:
        return self.nbytes

    def tobytes(self) -> bytes:
        return b"".join(self.parts)

    def __repr__(self) -> str:
        return f"<ValueParts {len(self.parts)} parts, {self.nbytes} bytes>"


#: What ``Store.put`` takes as a value.
Value = Union[bytes, bytearray, memoryview, ValueParts]


def check_keys(keys: Sequence[str]) -> list[str]:
    """``keys`` as a list, each checked against the key rules.

    Raises :class:`~kvcore.errors.StoreKeyError` naming the first bad key.  A ``str``
    on its own is refused (it is a sequence of one-character keys by accident)."""
    if isinstance(keys, (str, bytes)):
        raise StoreKeyError(f"keys must be a sequence of str, got the single "
                            f"{type(keys).__name__} {keys!r}")
    out = list(keys)
    for k in out:
        if not isinstance(k, str) or not _KEY_RE.match(k):
            raise StoreKeyError(f"store key {k!r} is not 1..200 characters of "
                                "[A-Za-z0-9._-]")
    return out


def check_items(items: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """``items`` as a list of ``(key, value)`` with checked keys and bytes-like values."""
    if isinstance(items, (str, bytes, dict)):
        raise StoreKeyError(f"items must be a sequence of (key, value) pairs, got "
                            f"{type(items).__name__}")
    out = []
    for item in items:
        try:
            key, value = item
        except (TypeError, ValueError):
            raise StoreKeyError(f"items must be (key, value) pairs, got {item!r:.80}") from None
        if not isinstance(value, (bytes, bytearray, memoryview, ValueParts)):
            raise StoreKeyError(f"the value of {key!r} must be bytes, got "
                                f"{type(value).__name__}")
        out.append((key, value))
    check_keys([k for k, _ in out])
    return out


class Store(abc.ABC):
    """A batch key/value store of opaque bytes (see the module docstring for the rules).

    Subclasses set :attr:`name` and :attr:`schemes`, implement :meth:`from_url` and the
    four ``_``-prefixed batch methods, and may override :meth:`_close` and
    :meth:`probe`.  The public methods check the keys, refuse calls after
    :meth:`close` and skip empty batches, so implementations never see those cases.
    """

    #: The plugin's name (``"redis"``, ``"file"``).
    name: ClassVar[str] = ""
    #: URL schemes this class opens (``("redis", "rediss")``).
    schemes: ClassVar[tuple[str, ...]] = ()
    api_version: ClassVar[int] = STORE_API_VERSION
    #: Whether ``_put`` takes :class:`ValueParts` values as they are (an instance may
    #: decide at run time); otherwise they arrive joined into ``bytes``.
    accepts_parts: bool = False

    def __init__(self) -> None:
        self._closed = False
        self._close_lock = threading.Lock()

    # --- construction -------------------------------------------------------------

    @classmethod
    @abc.abstractmethod
    def from_url(cls, url: str, **options: Any) -> Store:
        """Open the store at ``url``; ``options`` override the URL's query options.

        Raises :class:`~kvcore.errors.StoreConfigError` for a malformed URL or unknown
        option.  Opening need not contact the server (the first call will)."""

    @classmethod
    def probe(cls) -> None:
        """Check that this store can run here (its library is importable and recent
        enough); raise :class:`~kvcore.errors.StoreUnavailableError` with the reason."""

    # --- identity -----------------------------------------------------------------

    @property
    @abc.abstractmethod
    def url(self) -> str:
        """The URL this store was opened with, with any password removed."""

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<{type(self).__name__} {self.url}{state}>"

    # --- the batch operations ------------------------------------------------------

    def put(self, items: Sequence[tuple[str, Value]]) -> None:
        """Write every ``(key, value)``; a key written twice holds the later value.

        Not atomic across keys: on :class:`~kvcore.errors.StoreConnectionError` some
        may have been written (a reader then sees whole values or none, never part of
        one).  :class:`~kvcore.errors.StorePartialError.failed` lists the keys known
        not to be written."""
        checked = check_items(items)
        self._check_open()
        if not self.accepts_parts:
            checked = [(k, v.tobytes() if isinstance(v, ValueParts) else v) for k, v in checked]
        if checked:
            self._put(checked)

    def get(self, keys: Sequence[str]) -> list[bytes | None]:
        """The value of each key, in order (``None`` where there is none)."""
        checked = check_keys(keys)
        self._check_open()
        return self._get(checked) if checked else []

    def exists(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key has a value, in order."""
        checked = check_keys(keys)
        self._check_open()
        return self._exists(checked) if checked else []

    def delete(self, keys: Sequence[str]) -> int:
        """Remove the keys; returns how many had a value.  Missing keys are fine."""
        checked = check_keys(keys)
        self._check_open()
        return self._delete(checked) if checked else 0

    @abc.abstractmethod
    def _put(self, items: list[tuple[str, Value]]) -> None: ...

    @abc.abstractmethod
    def _get(self, keys: list[str]) -> list[bytes | None]: ...

    @abc.abstractmethod
    def _exists(self, keys: list[str]) -> list[bool]: ...

    @abc.abstractmethod
    def _delete(self, keys: list[str]) -> int: ...

    # --- lifetime -----------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Release connections and files; idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._close()

    def _close(self) -> None:
        """Release resources (called once, by :meth:`close`)."""

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"store {self.url} is closed")

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
