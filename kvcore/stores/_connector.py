"""StoreConnector: the one object a cache manager owns to share blocks through a store.

What the manager calls, and when (nothing else; every method is thread-safe):

1. **Construction**, once, with the manager: ``StoreConnector.open(url, config,
   model_id=..., namespace=..., mac_key=...)``, or ``StoreConnector(store, namespace,
   layout)`` around a Store it opened itself.  Opening contacts nothing.
2. **A block became complete** (every layer of a full block written, its chain key
   known): ``offer([(chain_key, arrays), ...])`` with host numpy copies of the block,
   one array per layer shaped as :attr:`layout` says.  Returns at once: the blocks go
   on a bounded queue and a background thread encodes and sends them in pipelined
   batches.  When the queue is full the blocks are dropped and counted; ``offer``
   never waits.  The arrays must not be modified afterwards (pass fresh copies).
   Blocks that were themselves loaded from the store need not be offered again.
   ``offer_planes(chain_keys, planes)`` takes a batch of blocks as K and V planes
   per layer (what one gather per plane gives), with the same values, and checks
   per array instead of per block: the manager's form.  ``offer_lazy(chain_keys,
   block_bytes, produce)`` queues blocks whose arrays ``produce()`` makes later, on
   the writer thread (``None`` for a block that changed meanwhile): a manager with
   host pools copies its served blocks there, off the engine's thread.
3. **allocate(), after the local prefix hits**, once it knows the request fits:
   ``fetch_run(chain_keys_of_the_next_full_blocks)`` asks the store for all of them
   in one round trip and returns the decoded arrays of the leading run found (block
   0, 1, ... up to the first miss).  Load them into fresh blocks and count them as
   hits; ask for nothing when the breaker is open (it answers ``[]`` at once).
4. **Manager close**: ``close()`` sends what is queued (up to a timeout) and closes
   the store.  ``flush(timeout)`` waits for the queue without closing (tests, a
   clean shutdown, before a demo's second process starts).
5. **Statistics**: ``stats()`` returns a :class:`StoreStats`.

Faults never become wrong data or crashes.  Every value is checked (fingerprint,
block key, shapes, checksum or MAC) before it is returned; a value that fails is a
miss, counted, and deleted from the store by the background thread.  A store error
or timeout is a miss (reads) or a dropped block (writes), counted; after
``failure_threshold`` consecutive failures the circuit breaker opens and the store
is left alone for ``cooldown_s`` seconds, then one trial call decides.  With
``strict=True`` read errors and an open breaker raise instead, and write errors are
raised by the next ``offer`` / ``flush`` / ``close``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import (DtypeMismatchError, ShapeMismatchError,
                      StoreClosedError, StoreConfigError, StoreConnectionError, StoreError,
                      StoreKeyError, StorePartialError, StoreTimeoutError,
                      StoreUnavailableError)
from ._breaker import BreakerState, CircuitBreaker
from ._codec import BlockCodec
from ._format import ArraySpec
from ._keys import DIGEST_SIZE
from ._namespace import FROM_CONFIG, StoreNamespace, block_layout
from ._offers import LazyBlock, LazyJob, PlaneBlock
from ._registry import open_store
from ._stats import StoreStats
from ._store import Store

__all__ = ["StoreConnector"]

Block = tuple[bytes, Sequence[np.ndarray]]


@dataclass
class _Counters:
    lookups: int = 0
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    blocks_offered: int = 0
    blocks_written: int = 0
    blocks_skipped_existing: int = 0
    dropped_writes: int = 0
    errors: int = 0
    timeouts: int = 0
    breaker_rejections: int = 0
    corrupt_values: int = 0
    deleted_values: int = 0
    blocks_changed: int = 0
    last_error: str | None = None


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise StoreConfigError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _check_digest(digest: object, size: int) -> bytes:
    if not isinstance(digest, (bytes, bytearray)) or len(digest) != size:
        raise StoreKeyError(f"a chain key must be {size} bytes, got {digest!r:.80}")
    return bytes(digest)


class StoreConnector:
    """Write-behind and read-through between a cache manager and a :class:`Store`
    (see the module docstring for what to call when)."""

    def __init__(self, store: Store, namespace: StoreNamespace, layout: Sequence[Any], *,
                 mac_key: bytes | None = None, strict: bool = False,
                 queue_blocks: int = 1024, queue_bytes: int = 256 << 20,
                 batch_blocks: int = 32, batch_bytes: int = 64 << 20,
                 failure_threshold: int = 3, cooldown_s: float = 2.0,
                 skip_existing: bool = True, delete_corrupt: bool = True,
                 close_store: bool = True, key_size: int = DIGEST_SIZE,
                 read_window: int = 4 << 20,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not isinstance(store, Store):
            raise StoreConfigError(f"store must be a kvcore.stores.Store, got {store!r}")
        if not isinstance(namespace, StoreNamespace):
            raise StoreConfigError(f"namespace must be a StoreNamespace, got {namespace!r}")
        specs = [ArraySpec.of(s) for s in layout] if not isinstance(layout, np.ndarray) else []
        if not specs:
            raise StoreConfigError("layout must list one (shape, dtype) per array of a block")
        if mac_key is not None and (not isinstance(mac_key, bytes) or not 16 <= len(mac_key) <= 64):
            raise StoreConfigError("mac_key must be 16..64 bytes or None")
        self._store = store
        self._namespace = namespace
        self._layout = tuple(specs)
        if isinstance(key_size, bool) or not isinstance(key_size, int) or not 16 <= key_size <= 64:
            raise StoreConfigError(f"key_size must be 16..64 bytes, got {key_size!r}")
        self._key_size = key_size
        self._codec = BlockCodec(namespace.fingerprint, specs, key_len=key_size,
                                 mac_key=mac_key)
        self._strict = bool(strict)
        self._queue_blocks = _positive_int("queue_blocks", queue_blocks)
        self._queue_bytes_max = _positive_int("queue_bytes", queue_bytes)
        self._batch_blocks = _positive_int("batch_blocks", batch_blocks)
        self._batch_bytes = _positive_int("batch_bytes", batch_bytes)
        self._read_window = _positive_int("read_window", read_window)
        self._reader_pool: ThreadPoolExecutor | None = None
        self._skip_existing = bool(skip_existing)
        self._delete_corrupt = bool(delete_corrupt)
        self._close_store = bool(close_store)
        self._breaker = CircuitBreaker(failure_threshold, cooldown_s, clock)
        self._lock = threading.Lock()          # counters
        self._cond = threading.Condition()     # queue, worker state
        self._queue: deque[tuple[bytes, Sequence[np.ndarray], int]] = deque()
        self._queued_bytes = 0
        self._deletes: list[str] = []
        self._inflight = 0
        self._closing = False
        self._closed = False
        self._worker: threading.Thread | None = None
        self._pending_error: StoreError | None = None
        self._c = _Counters()

    @classmethod
    def open(cls, url: str, config: Any, *, model_id: Any = FROM_CONFIG,
             namespace: Any = FROM_CONFIG, store_options: dict[str, Any] | None = None,
             **kwargs: Any) -> StoreConnector:
        """Open the store at ``url`` for a cache of ``config`` (a CacheConfig): the
        namespace and the block layout (one ``[2, block_size, num_kv_heads, head_dim]``
        array per layer) come from it, and ``model_id`` / ``namespace`` unless given
        (the config's ``model_id`` / ``store_namespace``).  ``store_options`` go to the
        store (``password``, ``timeout``, TLS files); other keywords to the connector."""
        ns = StoreNamespace.from_config(config, model_id=model_id, namespace=namespace)
        store = open_store(url, **(store_options or {}))
        try:
            return cls(store, ns, block_layout(config), **kwargs)
        except BaseException:
            store.close()
            raise

    # --- what it is -----------------------------------------------------------------

    @property
    def store(self) -> Store:
        return self._store

    @property
    def namespace(self) -> StoreNamespace:
        return self._namespace

    @property
    def layout(self) -> tuple[ArraySpec, ...]:
        """One :class:`ArraySpec` per array of a block, in order."""
        return self._layout

    @property
    def strict(self) -> bool:
        return self._strict

    @property
    def breaker_state(self) -> BreakerState:
        return self._breaker.state

    def __repr__(self) -> str:
        return (f"<StoreConnector {self._store.url} ns={self._namespace.namespace} "
                f"breaker={self._breaker.state.value}>")

    # --- write-behind ---------------------------------------------------------------

    def offer(self, blocks: Iterable[Block]) -> int:
        """Queue complete blocks for the store; returns how many were accepted.

        Never blocks: blocks that do not fit the queue (``queue_blocks``,
        ``queue_bytes``), or arrive while the breaker is open, are dropped and counted.
        Raises :class:`~kvcore.errors.StoreKeyError`,
        :class:`~kvcore.errors.ShapeMismatchError` or
        :class:`~kvcore.errors.DtypeMismatchError` (queueing none of ``blocks``) for a
        bad chain key or arrays that do not match :attr:`layout`."""
        self._check_open()
        self._raise_pending()
        staged = [self._check_block(block) for block in blocks]
        return self._enqueue(staged)

    def offer_planes(self, chain_keys: Sequence[bytes], planes: Sequence[np.ndarray]) -> int:
        """:meth:`offer` for ``n`` blocks given as planes: per layer of :attr:`layout`
        (each ``[2, *rest]``), K then V as ``[n, *rest]`` arrays (``2 * layers``
        arrays), block ``i`` being row ``i`` of each, ``chain_keys[i]`` its key.

        The value of each block is byte for byte the one :meth:`offer` makes of its
        ``[2, *rest]`` arrays, but nothing is stacked or sliced on the caller's thread
        (the checks are per array, not per block): what a manager hands over from one
        gather per plane.  The planes must not be modified afterwards."""
        self._check_open()
        self._raise_pending()
        digests = [_check_digest(d, self._key_size) for d in chain_keys]
        n = len(digests)
        if isinstance(planes, np.ndarray) or len(planes) != 2 * len(self._layout):
            count = "an array" if isinstance(planes, np.ndarray) else f"{len(planes)} arrays"
            raise ShapeMismatchError(f"blocks as planes are {2 * len(self._layout)} arrays (K "
                                     f"and V of each layer), got {count}")
        nbytes = 0
        for i, a in enumerate(planes):
            spec = self._layout[i // 2]
            want = (n, *spec.shape[1:])
            if not isinstance(a, np.ndarray):
                raise DtypeMismatchError(f"plane {i} must be a host numpy array, got "
                                         f"{type(a).__name__}")
            if a.dtype != spec.dtype:
                raise DtypeMismatchError(f"plane {i} has dtype {a.dtype}, expected {spec.dtype} "
                                         f"({spec.label})")
            if spec.shape[0] != 2 or a.shape != want:
                raise ShapeMismatchError(f"plane {i} has shape {a.shape}, expected {want} (K or "
                                         f"V of {n} blocks of layer shape {spec.shape})")
            nbytes += a.nbytes
        each = nbytes // n if n else 0
        return self._enqueue([(d, PlaneBlock(planes, b), each) for b, d in enumerate(digests)])

    def offer_lazy(self, chain_keys: Sequence[bytes], block_bytes: int,
                   produce: Callable[[], Sequence[Sequence[np.ndarray] | None]]) -> int:
        """:meth:`offer` for blocks whose arrays are made later, on the writer thread:
        ``produce()`` is called once, before the first of them is encoded, and returns
        per block its arrays (as :meth:`offer` takes them, or the ``2 * layers`` planes
        of one block) or ``None`` for a block that changed in the meantime: that one is
        not written (counted in ``blocks_changed`` and ``dropped_writes``).  An
        exception from ``produce`` drops them all (counted, ``last_error``).

        For a manager whose pools are host memory: the copy of a completed block then
        leaves the engine's thread, and ``produce`` proves the block unchanged after
        copying it.  ``block_bytes`` sizes each block for the queue."""
        self._check_open()
        self._raise_pending()
        digests = [_check_digest(d, self._key_size) for d in chain_keys]
        size = _positive_int("block_bytes", block_bytes)
        if not callable(produce):
            raise StoreConfigError(f"produce must be callable, got {produce!r:.80}")
        job = LazyJob(produce, len(digests))
        return self._enqueue([(d, LazyBlock(job, i), size) for i, d in enumerate(digests)])

    def _resolve(self, todo: list[tuple[str, tuple[bytes, Any, int]]]
                 ) -> list[tuple[str, tuple[bytes, Any, int]]]:
        """Lazy blocks of ``todo`` made concrete (writer thread); changed ones left out."""
        out = []
        changed = failed = 0
        reported: set[int] = set()
        for key, (digest, arrays, size) in todo:
            if isinstance(arrays, LazyBlock):
                made = arrays.job.get(arrays.index)
                if made is None or isinstance(made, BaseException):
                    if isinstance(made, BaseException):
                        failed += 1
                        if id(made) not in reported:  # once per failed produce()
                            reported.add(id(made))
                            self._error(made, pending=False)
                    else:
                        changed += 1
                    continue
                arrays = made
            out.append((key, (digest, arrays, size)))
        if changed or failed:
            self._count(blocks_changed=changed, dropped_writes=changed + failed)
        return out

    def _enqueue(self, staged: list[tuple[bytes, Sequence[np.ndarray], int]]) -> int:
        if not staged:
            return 0
        accepted = dropped = 0
        if self._breaker.state is BreakerState.open:
            dropped = len(staged)
        else:
            with self._cond:
                for item in staged:
                    if (len(self._queue) >= self._queue_blocks
                            or self._queued_bytes + item[2] > self._queue_bytes_max):
                        dropped += 1
                        continue
                    self._queue.append(item)
                    self._queued_bytes += item[2]
                    accepted += 1
                if accepted:
                    self._ensure_worker()
                    self._cond.notify()
        with self._lock:
            self._c.blocks_offered += accepted
            self._c.dropped_writes += dropped
        return accepted

    def _check_block(self, block: Any) -> tuple[bytes, Sequence[np.ndarray], int]:
        try:
            digest, arrays = block
        except (TypeError, ValueError):
            raise StoreKeyError(f"offer takes (chain_key, arrays) pairs, got "
                                f"{block!r:.80}") from None
        digest = _check_digest(digest, self._key_size)
        if isinstance(arrays, np.ndarray) or len(arrays) != len(self._layout):
            count = "an array" if isinstance(arrays, np.ndarray) else f"{len(arrays)} arrays"
            raise ShapeMismatchError(f"a block is {len(self._layout)} arrays (one per layer), "
                                     f"got {count}")
        nbytes = 0
        for i, (a, spec) in enumerate(zip(arrays, self._layout)):
            if not isinstance(a, np.ndarray):
                raise DtypeMismatchError(f"array {i} of a block must be a host numpy array, "
                                         f"got {type(a).__name__}")
            if a.dtype != spec.dtype:
                raise DtypeMismatchError(f"array {i} of a block has dtype {a.dtype}, expected "
                                         f"{spec.dtype} ({spec.label})")
            if a.shape != spec.shape:
                raise ShapeMismatchError(f"array {i} of a block has shape {a.shape}, expected "
                                         f"{spec.shape}")
            nbytes += a.nbytes
        return digest, arrays, nbytes

    def _ensure_worker(self) -> None:
        if self._worker is None:  # called holding self._cond
            self._worker = threading.Thread(target=self._run, name="kvcore-store-writer",
                                            daemon=True)
            self._worker.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._deletes and not self._closing:
                    self._cond.wait()
                if not self._queue and not self._deletes:
                    return  # closing and drained
                deletes, self._deletes = self._deletes, []
                batch = []
                size = 0
                while self._queue and len(batch) < self._batch_blocks and (
                        not batch or size + self._queue[0][2] <= self._batch_bytes):
                    item = self._queue.popleft()
                    self._queued_bytes -= item[2]
                    size += item[2]
                    batch.append(item)
                self._inflight = len(batch) + len(deletes)
            try:
                if deletes:
                    self._delete(deletes)
                if batch:
                    self._write(batch)
            finally:
                with self._cond:
                    self._inflight = 0
                    self._cond.notify_all()

    def _write(self, batch: list[tuple[bytes, Sequence[np.ndarray], int]]) -> None:
        if not self._breaker.allow():
            self._count(dropped_writes=len(batch))
            return
        keys = self._namespace.keys([digest for digest, _, _ in batch])
        todo = list(zip(keys, batch))
        items: list[tuple[str, Any]] = []
        try:
            if self._skip_existing:
                present = self._store.exists(keys)
                todo = [(k, b) for (k, b), p in zip(todo, present) if not p]
                self._count(blocks_skipped_existing=len(batch) - len(todo))
            todo = self._resolve(todo)
            # Stores that write scattered buffers get the arrays' own memory: no copy.
            encode = self._codec.encode_parts if self._store.accepts_parts else \
                self._codec.encode
            items = [(k, encode(digest, arrays)) for k, (digest, arrays, _) in todo]
            if items:
                self._store.put(items)
        except StorePartialError as exc:
            # The store answered; one node is down.  Not a reason to stop using it.
            self._breaker.success()
            failed = set(exc.failed) if items else set(keys)
            written = [len(v) for k, v in items if k not in failed]
            self._count(blocks_written=len(written), bytes_written=sum(written),
                        dropped_writes=len(todo) - len(written))
            self._error(exc)
        except Exception as exc:  # noqa: BLE001 - a plugin bug must not kill the thread
            self._breaker.failure()
            self._count(dropped_writes=len(todo))
            self._error(exc)
        else:
            self._breaker.success()
            self._count(blocks_written=len(items), bytes_written=sum(len(v) for _, v in items))

    def _delete(self, keys: list[str]) -> None:
        try:
            removed = self._store.delete(keys)
        except Exception as exc:  # noqa: BLE001 - best effort; the value stays a miss
            self._error(exc, pending=False)
            return
        self._count(deleted_values=removed)

    # --- read-through ---------------------------------------------------------------

    def fetch_run(self, chain_keys: Sequence[bytes]) -> list[list[np.ndarray]]:
        """The blocks of the leading run of ``chain_keys`` found in the store, decoded.

        One store round trip for all keys that fit ``read_window`` bytes (4 MiB); a
        longer run is read window by window, each fetched while the one before is
        checked (replies of tens of MiB are slower than 4 MiB ones, see
        ``docs/scale-out.md``).  Returns one list of arrays per block
        (shaped as :attr:`layout`; read-only views, copy them into the pool), for
        ``chain_keys[0]``, ``[1]``, ... up to the first key that is missing, damaged
        or foreign.  A store error or an open breaker returns ``[]`` (``strict``:
        raises :class:`~kvcore.errors.StoreConnectionError` /
        :class:`~kvcore.errors.StoreUnavailableError`).  Counts hits, misses, bytes."""
        self._check_open()
        digests = [_check_digest(d, self._key_size) for d in chain_keys]
        n = len(digests)
        if n == 0:
            return []
        keys = self._namespace.keys(digests)
        if not self._breaker.allow():
            self._count(lookups=1, misses=n, breaker_rejections=1)
            if self._strict:
                raise StoreUnavailableError(
                    f"store {self._store.url}: circuit open after repeated errors (last: "
                    f"{self._c.last_error}); retrying in at most {self._breaker.cooldown_s} s")
            return []
        step = max(1, self._read_window // self._codec.value_len)
        windows = [(i, keys[i:i + step]) for i in range(0, n, step)]
        values, error = self._get_window(windows[0][1])
        if values is None:  # the store failed outright
            self._breaker.failure()
            self._error(error, pending=False)  # type: ignore[arg-type]
            self._count(lookups=1, misses=n)
            if not self._strict:
                return []
            if isinstance(error, StoreError):
                raise error
            raise StoreConnectionError(f"store {self._store.url} failed: "
                                       f"{type(error).__name__}: {error}") from error
        self._breaker.success()  # it answered (a partial failure is one node, not the store)
        if error is not None:
            self._error(error, pending=False)
            if self._strict:
                self._count(lookups=1, misses=n)
                raise error
        run: list[list[np.ndarray]] = []
        nbytes = 0
        corrupt: list[str] = []
        ahead = None
        later_error: BaseException | None = None
        for w, (start, window) in enumerate(windows):
            if w:
                values, later_error = ahead.result()  # type: ignore[union-attr]
                if later_error is not None:
                    self._error(later_error, pending=False)
                    if values is None:
                        self._breaker.failure()
                        break
            if w + 1 < len(windows):
                # Fetch the next window while this one is checked (the CRC releases
                # the GIL): the check then costs no time next to the transfer.
                ahead = self._readers().submit(self._get_window, windows[w + 1][1])
            ended = False
            for digest, key, value in zip(digests[start:], window, values):
                if value is None:
                    ended = True
                    break
                try:
                    arrays = self._codec.decode(value, digest)
                except Exception:  # noqa: BLE001 - damaged, foreign, or not bytes at all
                    corrupt.append(key)
                    ended = True
                    break
                run.append(arrays)
                nbytes += len(value)
            if ended:
                break
        self._count(lookups=1, hits=len(run), misses=n - len(run), bytes_read=nbytes,
                    corrupt_values=len(corrupt))
        if corrupt and self._delete_corrupt:
            with self._cond:
                self._deletes.extend(corrupt)
                self._ensure_worker()
                self._cond.notify()
        if later_error is not None and self._strict:
            if isinstance(later_error, StoreError):
                raise later_error
            raise StoreConnectionError(f"store {self._store.url} failed: "
                                       f"{type(later_error).__name__}: {later_error}") \
                from later_error
        return run

    def _get_window(self, keys: list[str]) -> tuple[list[Any] | None, BaseException | None]:
        """``(values, None)``, ``(partial values, the partial error)`` or ``(None,
        error)``: never raises, so a prefetching thread hands back faults too."""
        try:
            values = self._store.get(keys)
            if not isinstance(values, list) or len(values) != len(keys):
                raise StoreConnectionError(f"store {self._store.url} answered {len(keys)} keys "
                                           f"with {values!r:.80}")
            return values, None
        except StorePartialError as exc:
            results = list(exc.results)
            return (results if len(results) == len(keys) else [None] * len(keys)), exc
        except Exception as exc:  # noqa: BLE001 - a fault is a miss, never a crash
            return None, exc

    def _readers(self) -> ThreadPoolExecutor:
        with self._cond:
            if self._reader_pool is None:
                self._reader_pool = ThreadPoolExecutor(max_workers=2,
                                                       thread_name_prefix="kvcore-store-reader")
            return self._reader_pool

    # --- lifetime -------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued block was sent (or dropped); ``True`` when the
        queue drained within ``timeout`` seconds (``None``: wait as long as it takes).
        In strict mode, raises the first background write error."""
        drained = self._drain(timeout)
        self._raise_pending()
        return drained

    def _drain(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._deletes or self._inflight:
                if self._worker is None or not self._worker.is_alive():
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._cond.wait(remaining)
            return not (self._queue or self._deletes or self._inflight)

    def close(self, timeout: float | None = 5.0) -> None:
        """Send what is queued (waiting at most ``timeout`` seconds), stop the worker,
        close the store.  Blocks still queued after the timeout are dropped and
        counted.  Idempotent; in strict mode raises a background write error after
        closing."""
        with self._cond:
            if self._closed:
                return
        self._drain(timeout)
        with self._cond:
            self._closed = True
            self._closing = True
            left = len(self._queue)
            self._queue.clear()
            self._queued_bytes = 0
            self._cond.notify_all()
            worker = self._worker
        self._count(dropped_writes=left)
        if worker is not None:
            worker.join(timeout)
        if self._reader_pool is not None:
            self._reader_pool.shutdown(wait=True)
        if self._close_store:
            self._store.close()
        self._raise_pending()

    def __enter__(self) -> StoreConnector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"store connector for {self._store.url} is closed")

    # --- counters -----------------------------------------------------------------

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self._c, name, getattr(self._c, name) + delta)

    def _error(self, exc: BaseException, *, pending: bool = True) -> None:
        text = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self._c.errors += 1
            if isinstance(exc, (StoreTimeoutError, TimeoutError)):
                self._c.timeouts += 1
            self._c.last_error = text[:500]
            if pending and self._strict and self._pending_error is None:
                self._pending_error = exc if isinstance(exc, StoreError) else \
                    StoreConnectionError(f"store {self._store.url} failed: {text}")

    def _raise_pending(self) -> None:
        if self._strict:
            with self._lock:
                error, self._pending_error = self._pending_error, None
            if error is not None:
                raise error

    def stats(self) -> StoreStats:
        """The counters now (a frozen pydantic model)."""
        with self._lock:
            c = dict(self._c.__dict__)
        with self._cond:
            queue_blocks, queue_bytes = len(self._queue), self._queued_bytes
        asked = c["hits"] + c["misses"]
        return StoreStats(store=self._store.url, hit_rate=c["hits"] / asked if asked else 0.0,
                          breaker_state=self._breaker.state, breaker_opens=self._breaker.opens,
                          queue_blocks=queue_blocks, queue_bytes=queue_bytes, **c)
