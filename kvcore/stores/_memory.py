"""``memory://NAME``: a store in this process's memory, shared by name.

For tests, notebooks and a manager that wants the connector's machinery without a
server.  Every ``memory://NAME`` opened in one process sees the same data, until
:meth:`MemoryStore.drop` forgets it; nothing outlives the process.  ``max_bytes``
bounds it: past that the least recently written or read values are evicted, like a
Redis ``allkeys-lru`` instance.
"""

from __future__ import annotations

import threading
import urllib.parse
from collections import OrderedDict
from typing import Any, ClassVar

from ..errors import StoreConfigError
from ._store import Store
from ._url import StoreOptions, redact_url

__all__ = ["MemoryStore"]


class _Shelf:
    """One named store's data: an LRU of values under one lock."""

    def __init__(self, max_bytes: int) -> None:
        self.lock = threading.Lock()
        self.data: OrderedDict[str, bytes] = OrderedDict()
        self.nbytes = 0
        self.max_bytes = max_bytes
        self.users = 0


class MemoryStore(Store):
    """Values in a process-wide dictionary named by the URL's host part."""

    name = "memory"
    schemes = ("memory",)
    _shelves: ClassVar[dict[str, _Shelf]] = {}
    _shelves_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, name: str, *, max_bytes: int = 0) -> None:
        super().__init__()
        self._name = name
        self._max_bytes = max_bytes
        with self._shelves_lock:
            shelf = self._shelves.get(name)
            if shelf is None:
                shelf = self._shelves[name] = _Shelf(max_bytes)
            elif max_bytes:
                shelf.max_bytes = max_bytes
            shelf.users += 1
        self._shelf = shelf

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MemoryStore:
        parts = urllib.parse.urlsplit(url)
        if "@" in parts.netloc:
            raise StoreConfigError(f"store URL {redact_url(url)!r}: a memory store takes no "
                                   "user or password")
        name = parts.netloc + parts.path.rstrip("/")
        if not name:
            raise StoreConfigError(f"store URL {redact_url(url)!r} names no store; use "
                               "memory://NAME")
        opts = StoreOptions(url, parts.query, options)
        max_bytes = opts.number("max_bytes", 0, integer=True)
        opts.finish()
        return cls(name, max_bytes=max_bytes)

    @classmethod
    def drop(cls, name: str) -> None:
        """Forget the data of ``memory://name`` (tests)."""
        with cls._shelves_lock:
            cls._shelves.pop(name, None)

    @property
    def url(self) -> str:
        suffix = f"?max_bytes={self._max_bytes}" if self._max_bytes else ""
        return f"memory://{self._name}{suffix}"

    @property
    def nbytes(self) -> int:
        """Bytes of values held."""
        return self._shelf.nbytes

    def _put(self, items: list[tuple[str, Any]]) -> None:
        shelf = self._shelf
        values = [(k, bytes(v)) for k, v in items]  # copy outside the lock
        with shelf.lock:
            for key, value in values:
                old = shelf.data.pop(key, None)
                if old is not None:
                    shelf.nbytes -= len(old)
                shelf.data[key] = value
                shelf.nbytes += len(value)
            while shelf.max_bytes and shelf.nbytes > shelf.max_bytes and shelf.data:
                _, evicted = shelf.data.popitem(last=False)
                shelf.nbytes -= len(evicted)

    def _get(self, keys: list[str]) -> list[bytes | None]:
        shelf = self._shelf
        out: list[bytes | None] = []
        with shelf.lock:
            for key in keys:
                value = shelf.data.get(key)
                if value is not None:
                    shelf.data.move_to_end(key)
                out.append(value)
        return out

    def _exists(self, keys: list[str]) -> list[bool]:
        with self._shelf.lock:
            return [k in self._shelf.data for k in keys]

    def _delete(self, keys: list[str]) -> int:
        shelf = self._shelf
        count = 0
        with shelf.lock:
            for key in keys:
                old = shelf.data.pop(key, None)
                if old is not None:
                    shelf.nbytes -= len(old)
                    count += 1
        return count

    def _close(self) -> None:
        with self._shelves_lock:
            self._shelf.users -= 1
