"""``file:///path``: blocks in one local directory, surviving restarts.

Layout::

    /path/kvcore-store.json      marker: {"format": "kvcore-disk-store", "version": 1}
    /path/3f/<key>               one file per value, in 256 shard directories chosen
                                 by a hash of the key (no directory grows past
                                 ~1/256 of the store)
    /path/3f/.tmp.<key>.<pid>.<n>  a write in progress

**Atomic writes.**  A value is written to a fresh temporary file in its shard
(``O_EXCL``: unique per process, thread and write) and renamed over the key with
``os.replace``, which is atomic on POSIX: a reader opens either the old file or the
new one, never a partial one, and two processes writing the same key concurrently
each rename a complete file (the last rename wins; both were valid values).

**fsync policy.**  By default nothing is fsynced.  This is a cache: after a power
loss a recent value may be missing or (on file systems that do not order data before
the rename) empty or torn, and every such file fails the value's own length and
checksum checks on read, so it is a counted miss and deleted, never wrong data.  An
fsync per block would cost milliseconds on every write for no gain in correctness.
``?fsync=1`` fsyncs each file and its directory before ``put`` returns, for
deployments that want written blocks to survive a crash.

**Size.**  ``?max_bytes=N`` bounds the store: after writes adding up to a tenth of N,
the oldest files (by modification time, refreshed on every read hit) are deleted
until the store holds at most 90% of N.  :meth:`DiskStore.prune` does the same on
demand and removes temporary files left by crashed writers.

Files are created ``0600`` and directories ``0700``: K/V are as private as prompts.
Values are plain files; no pickle, no database.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

from ..errors import StoreConnectionError, StoreConfigError
from ._store import Store, ValueParts
from ._url import StoreOptions, redact_url

__all__ = ["DiskStore"]

_MARKER = "kvcore-store.json"
_MARKER_DOC = {"format": "kvcore-disk-store", "version": 1}
_TMP = ".tmp."
_STALE_TMP_S = 3600.0
#: Temporary-file serial numbers, process-wide so two stores on one directory in one
#: process never pick the same name (next() on a count is atomic under the GIL).
_SERIAL = itertools.count()


_IOV_MAX = 512  # below every platform's IOV_MAX


def _write_all(fd: int, parts: tuple[memoryview, ...] | list[memoryview]) -> None:
    """Write every part, in order, however short the kernel's writes are."""
    pending = [p for p in parts if len(p)]
    while pending:
        written = os.writev(fd, pending[:_IOV_MAX])
        while written and pending:
            if written >= len(pending[0]):
                written -= len(pending[0])
                pending.pop(0)
            else:
                pending[0] = pending[0][written:]
                written = 0


class DiskStore(Store):
    """A directory of value files (see the module docstring)."""

    name = "file"
    schemes = ("file",)
    accepts_parts = True  # os.writev straight from the arrays' memory

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = False,
                 max_bytes: int = 0, max_value_bytes: int = 1 << 31) -> None:
        super().__init__()
        self._root = Path(root)
        self._fsync = fsync
        self._max_bytes = max_bytes
        self._max_value_bytes = max_value_bytes
        self._prune_lock = threading.Lock()
        self._written_since_prune = 0
        self._open_root()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> DiskStore:
        parts = urllib.parse.urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise StoreConfigError(f"store URL {redact_url(url)!r} names a host; a file store "
                                   "is local: file:///absolute/path")
        path = urllib.parse.unquote(parts.path)
        if not path.startswith("/") or path.rstrip("/") == "":
            raise StoreConfigError(f"store URL {redact_url(url)!r} needs an absolute directory "
                                   "other than /: file:///var/cache/kvcore")
        opts = StoreOptions(url, parts.query, options)
        fsync = opts.flag("fsync", False)
        max_bytes = opts.number("max_bytes", 0, integer=True)
        max_value_bytes = opts.number("max_value_bytes", 1 << 31, low=1, integer=True)
        opts.finish()
        return cls(path, fsync=fsync, max_bytes=max_bytes, max_value_bytes=max_value_bytes)

    @property
    def url(self) -> str:
        query = []
        if self._fsync:
            query.append("fsync=1")
        if self._max_bytes:
            query.append(f"max_bytes={self._max_bytes}")
        return f"file://{urllib.parse.quote(str(self._root))}" + (
            "?" + "&".join(query) if query else "")

    @property
    def root(self) -> Path:
        return self._root

    # --- layout -------------------------------------------------------------------

    def _open_root(self) -> None:
        marker = self._root / _MARKER
        try:
            if marker.exists():
                doc = json.loads(marker.read_text(encoding="utf-8"))
                if doc != _MARKER_DOC:
                    raise StoreConfigError(f"{marker} describes {doc!r}, this kvcore reads "
                                        f"{_MARKER_DOC!r}")
                return
            self._root.mkdir(mode=0o700, parents=True, exist_ok=True)
            if any(self._root.iterdir()):
                raise StoreConfigError(f"directory {self._root} is not empty and has no "
                                    f"{_MARKER}: refusing to use it as a kvcore store (give "
                                    "an empty or new directory)")
            tmp = self._root / f"{_MARKER}.{os.getpid()}.{threading.get_ident()}"
            tmp.write_text(json.dumps(_MARKER_DOC), encoding="utf-8")
            os.replace(tmp, marker)  # concurrent openers agree: same bytes either way
        except OSError as exc:
            raise StoreConnectionError(f"cannot open store directory {self._root}: "
                                       f"{exc}") from exc
        except ValueError as exc:  # a marker that is not JSON
            raise StoreConfigError(f"{marker} is not a kvcore store marker: {exc}") from None

    def _path(self, key: str) -> Path:
        shard = hashlib.blake2b(key.encode("ascii"), digest_size=1).hexdigest()
        return self._root / shard / key

    # --- operations -----------------------------------------------------------------

    def _put(self, items: list[tuple[str, Any]]) -> None:
        written = 0
        for key, value in items:
            self._write_one(self._path(key), value)
            written += len(value)
        if self._max_bytes:
            with self._prune_lock:
                self._written_since_prune += written
                due = self._written_since_prune * 10 >= self._max_bytes
            if due:
                self.prune()

    def _write_one(self, path: Path, value: Any) -> None:
        tmp = path.parent / f"{_TMP}{path.name}.{os.getpid()}.{next(_SERIAL)}"
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileNotFoundError:  # first value in this shard
                path.parent.mkdir(mode=0o700, exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                _write_all(fd, value.parts if isinstance(value, ValueParts)
                           else [memoryview(value).cast("B")])
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            if self._fsync:
                dir_fd = os.open(path.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise StoreConnectionError(f"store {self.url}: writing {path.name} failed: "
                                       f"{exc}") from exc

    def _get(self, keys: list[str]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for key in keys:
            path = self._path(key)
            try:
                with open(path, "rb", buffering=0) as fh:
                    size = os.fstat(fh.fileno()).st_size
                    if size > self._max_value_bytes:  # never read a huge stray file
                        out.append(None)
                        continue
                    out.append(fh.read())
                if self._max_bytes:
                    os.utime(path)  # a read hit counts as recent use for pruning
            except FileNotFoundError:
                out.append(None)
            except OSError as exc:
                raise StoreConnectionError(f"store {self.url}: reading {key} failed: "
                                           f"{exc}") from exc
        return out

    def _exists(self, keys: list[str]) -> list[bool]:
        return [self._path(k).is_file() for k in keys]

    def _delete(self, keys: list[str]) -> int:
        count = 0
        for key in keys:
            try:
                os.unlink(self._path(key))
                count += 1
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise StoreConnectionError(f"store {self.url}: deleting {key} failed: "
                                           f"{exc}") from exc
        return count

    # --- size -------------------------------------------------------------------------

    def prune(self, max_bytes: int | None = None) -> int:
        """Delete the least recently used values until the store holds at most 90% of
        ``max_bytes`` (default: the ``max_bytes`` option; 0 keeps every value), and
        temporary files older than an hour.  Returns the number of files deleted."""
        self._check_open()
        limit = self._max_bytes if max_bytes is None else max_bytes
        with self._prune_lock:
            self._written_since_prune = 0
        files = []
        deleted = 0
        now = time.time()
        for shard in self._root.iterdir():
            if not shard.is_dir():
                continue
            for entry in os.scandir(shard):
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                if entry.name.startswith(_TMP):
                    if now - st.st_mtime > _STALE_TMP_S:
                        deleted += self._unlink_quiet(entry.path)
                    continue
                files.append((st.st_mtime, st.st_size, entry.path))
        total = sum(size for _, size, _ in files)
        if limit and total > limit:
            target = limit * 9 // 10
            for _, size, path in sorted(files):
                if total <= target:
                    break
                deleted += self._unlink_quiet(path)
                total -= size
        return deleted

    @staticmethod
    def _unlink_quiet(path: str) -> int:
        try:
            os.unlink(path)
            return 1
        except FileNotFoundError:  # another process pruned it first
            return 0
        except OSError:
            return 0

    def disk_usage(self) -> tuple[int, int]:
        """``(files, bytes)`` of values held (a directory walk)."""
        count = total = 0
        for shard in self._root.iterdir():
            if shard.is_dir():
                for entry in os.scandir(shard):
                    if not entry.name.startswith(_TMP):
                        count += 1
                        try:
                            total += entry.stat().st_size
                        except FileNotFoundError:
                            count -= 1
        return count, total
