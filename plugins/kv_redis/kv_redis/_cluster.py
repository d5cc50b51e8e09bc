"""``redis+cluster://`` and ``rediss+cluster://``: a Redis Cluster.

Keys spread over all 16,384 slots (chain keys are random, and no ``{hash tag}`` is
used on purpose: one tag would put a deployment's every block on one master).  A
batch therefore crosses slots, and Redis refuses multi-key commands across slots, so
each batch is split by the master that owns each key's slot (redis-py's slot map)
and every master gets one non-transactional pipeline of single-key commands; the
masters' pipelines run in parallel threads, so a batch costs about one round trip
whatever the number of masters.

Fault isolation is per master.  redis-py's own cluster pipeline fails the whole batch
when one node is unreachable; here a failed master fails only its keys: the batch
raises :class:`~kvcore.errors.StorePartialError` with the results of the healthy
masters (reads of its keys are misses, writes to them are dropped), the master is
left alone for ``node_cooldown`` seconds (its keys fail at once instead of paying a
timeout each time), and the slot map is refreshed (at most once a second) so a
promoted replica or a resharding is picked up.  ``MOVED`` / ``ASK`` / ``TRYAGAIN``
answers are retried once through redis-py's redirect-following client.  Only when
every key failed does a batch raise a plain
:class:`~kvcore.errors.StoreConnectionError`, which counts towards the connector's
breaker.

Run the cluster with ``cluster-require-full-coverage no`` (and, for reads during a
failure, ``cluster-allow-reads-when-down yes``): with the default ``yes`` the
surviving masters refuse every key once one master is marked failed, and a cache
that loses a third of its keys would lose all of them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis.exceptions as rx
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from kvcore.errors import (StoreConfigError, StoreConnectionError, StorePartialError,
                           StoreTimeoutError)
from kvcore.stores import Store

from ._errors import describe, is_redirect, translate
from ._options import RedisTarget, parse_redis_url
from ._probe import probe_redis

#: One retry on a fresh connection after a connection error (pooled sockets go stale
#: when a server restarts); none after a timeout, which would only double the wait.
_ONE_RECONNECT = Retry(NoBackoff(), 1, supported_errors=(rx.ConnectionError,))

__all__ = ["RedisClusterStore"]

_REFRESH_INTERVAL_S = 1.0
_MAX_THREADS = 16


class _Failed:
    """A key's outcome when its master could not be asked."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class RedisClusterStore(Store):
    """A Redis Cluster as a block store (see the module docstring)."""

    name = "redis-cluster"
    schemes = ("redis+cluster", "rediss+cluster")

    def __init__(self, target: RedisTarget) -> None:
        super().__init__()
        self._target = target
        self._lock = threading.Lock()
        self._client: RedisCluster | None = None
        self._down: dict[str, float] = {}
        self._last_refresh = 0.0
        self._threads: ThreadPoolExecutor | None = None

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisClusterStore:
        target = parse_redis_url(url, options)
        if not target.cluster:
            raise StoreConfigError(f"{target.redacted} is a single-server URL; RedisStore "
                                   "opens it")
        return cls(target)

    @classmethod
    def probe(cls) -> None:
        probe_redis()

    @property
    def url(self) -> str:
        return self._target.redacted

    @property
    def client(self) -> RedisCluster:
        """The redis-py cluster client, created (and the cluster contacted) on first
        use."""
        with self._lock:
            if self._client is None:
                self._check_open()
                nodes = [ClusterNode(h, p) for h, p in self._target.nodes]
                try:
                    with translate(self.url, "cluster discovery"):
                        self._client = RedisCluster(
                            startup_nodes=nodes, require_full_coverage=False,
                            retry=_ONE_RECONNECT, **self._target.client_kwargs)
                except rx.RedisClusterException as exc:
                    raise StoreConnectionError(f"store {self.url}: cluster discovery failed: "
                                               f"{exc}") from exc
            return self._client

    # --- routing ----------------------------------------------------------------------

    def _route(self, keys: list[str]) -> tuple[dict[str, tuple[Any, list[int]]],
                                               dict[int, _Failed]]:
        """Keys grouped by the master owning their slot; keys no master owns."""
        client = self.client
        groups: dict[str, tuple[Any, list[int]]] = {}
        failed: dict[int, _Failed] = {}
        now = time.monotonic()
        for i, key in enumerate(keys):
            try:
                node = client.get_node_from_key(key)
            except (rx.RedisClusterException, rx.RedisError) as exc:
                failed[i] = _Failed(exc)
                continue
            if node is None:
                failed[i] = _Failed(rx.ConnectionError(f"no node serves key {key}"))
                continue
            until = self._down.get(node.name)
            if until is not None and now < until:
                failed[i] = _Failed(rx.ConnectionError(f"node {node.name} failed recently; "
                                                       f"retrying after {until - now:.1f} s"))
                continue
            groups.setdefault(node.name, (node, []))[1].append(i)
        return groups, failed

    def _node_pipeline(self, node: Any, keys: list[str],
                       add: Callable[[Any, str], None]) -> list[Any]:
        """One pipeline on one master: its results, or a _Failed per key."""
        try:
            conn = self.client.get_redis_connection(node)
            pipe = conn.pipeline(transaction=False)
            for key in keys:
                add(pipe, key)
            return pipe.execute(raise_on_error=False)
        except (rx.ConnectionError, rx.TimeoutError, OSError) as exc:
            self._down[node.name] = time.monotonic() + self._target.node_cooldown
            return [_Failed(exc)] * len(keys)
        except rx.RedisError as exc:
            return [_Failed(exc)] * len(keys)

    def _run(self, what: str, keys: list[str], add: Callable[[Any, str], None],
             retry: Callable[[RedisCluster, str], Any]) -> tuple[list[Any], list[BaseException]]:
        """Every key's result (or _Failed), running each master's pipeline in parallel."""
        groups, failed = self._route(keys)
        results: list[Any] = [None] * len(keys)
        for i, f in failed.items():
            results[i] = f
        jobs = [(node, [keys[i] for i in idx], idx) for node, idx in groups.values()]
        if len(jobs) == 1:
            outcomes = [self._node_pipeline(jobs[0][0], jobs[0][1], add)]
        elif jobs:
            pool = self._executor()
            futures = [pool.submit(self._node_pipeline, node, ks, add) for node, ks, _ in jobs]
            outcomes = [f.result() for f in futures]
        else:
            outcomes = []
        for (_, _, idx), outcome in zip(jobs, outcomes):
            for i, r in zip(idx, outcome):
                results[i] = r
        redirected = [i for i, r in enumerate(results) if is_redirect(r)]
        if redirected or any(isinstance(r, _Failed) for r in results):
            self._refresh()
        for i in redirected:  # the slot moved: ask through the redirect-following client
            try:
                results[i] = retry(self.client, keys[i])
            except (rx.RedisError, rx.RedisClusterException, OSError) as exc:
                results[i] = _Failed(exc)
        errors = []
        for i, r in enumerate(results):
            if isinstance(r, _Failed):
                errors.append(r.error)
            elif isinstance(r, Exception):
                results[i] = _Failed(r)
                errors.append(r)
        return results, errors

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._threads is None:
                self._threads = ThreadPoolExecutor(max_workers=_MAX_THREADS,
                                                   thread_name_prefix="kvcore-redis-cluster")
            return self._threads

    def _refresh(self) -> None:
        """Re-read the slot map from a live node (rate-limited)."""
        now = time.monotonic()
        with self._lock:
            if now - self._last_refresh < _REFRESH_INTERVAL_S or self._client is None:
                return
            self._last_refresh = now
            client = self._client
        try:
            client.nodes_manager.initialize()
        except Exception:  # noqa: BLE001 - every node down: keep the old map
            pass

    def _raise(self, what: str, keys: list[str], results: list[Any],
               errors: list[BaseException], partial: list[Any]) -> None:
        failed = [k for k, r in zip(keys, results) if isinstance(r, _Failed)]
        first = errors[0]
        detail = describe(first)
        if len(failed) == len(keys):
            cls = StoreTimeoutError if isinstance(first, rx.TimeoutError) else StoreConnectionError
            raise cls(f"store {self.url}: {what} failed for all {len(keys)} keys: "
                      f"{detail}") from first
        raise StorePartialError(f"store {self.url}: {what} failed for {len(failed)} of "
                                f"{len(keys)} keys (a node is down?): {detail}",
                                results=partial, failed=failed)

    # --- operations -------------------------------------------------------------------

    def _put(self, items: list[tuple[str, Any]]) -> None:
        ttl = self._target.ttl or None
        values = dict(items)  # a key given twice: the later value, as in Store.put
        keys = list(values)
        results, errors = self._run(
            "SET", keys, lambda pipe, k: pipe.set(k, values[k], ex=ttl),
            lambda client, k: client.set(k, values[k], ex=ttl))
        if errors:
            self._raise("SET", keys, results, errors,
                        [not isinstance(r, _Failed) for r in results])

    def _get(self, keys: list[str]) -> list[bytes | None]:
        results, errors = self._run("GET", keys, lambda pipe, k: pipe.get(k),
                                    lambda client, k: client.get(k))
        values = [None if isinstance(r, _Failed) else r for r in results]
        if errors:
            self._raise("GET", keys, results, errors, values)
        return values

    def _exists(self, keys: list[str]) -> list[bool]:
        results, errors = self._run("EXISTS", keys, lambda pipe, k: pipe.exists(k),
                                    lambda client, k: client.exists(k))
        present = [False if isinstance(r, _Failed) else bool(r) for r in results]
        if errors:
            self._raise("EXISTS", keys, results, errors, present)
        return present

    def _delete(self, keys: list[str]) -> int:
        results, errors = self._run("DEL", keys, lambda pipe, k: pipe.delete(k),
                                    lambda client, k: client.delete(k))
        removed = [0 if isinstance(r, _Failed) else int(r) for r in results]
        if errors:
            self._raise("DEL", keys, results, errors, [bool(n) for n in removed])
        return sum(removed)

    def _close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
            threads, self._threads = self._threads, None
        if threads is not None:
            threads.shutdown(wait=False)
        if client is not None:
            client.close()
