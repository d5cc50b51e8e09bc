"""``redis://`` and ``rediss://``: one Redis server (or a primary behind a proxy).

Every batch is one round trip (reads: per ``read_window`` bytes): ``MGET`` for reads,
one non-transactional pipeline of ``SET`` (``SET ... EX ttl`` with a TTL) for writes, of
``EXISTS`` for existence and one ``DEL`` for deletes (split into chunks of 10,000 keys
so no single command grows without bound). redis-py parses replies with hiredis when it
is installed (it is a dependency of kvcore-redis); commands are packed by
:mod:`kv_redis._packer`, which sends block values from the arrays' own memory instead of
copying them. Sockets time out after ``timeout`` seconds; a command that met a
connection error is retried once on a fresh connection (a server restart leaves stale
pooled connections), a timeout never: the connector's breaker decides about the rest.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.exceptions as rx
from redis.backoff import NoBackoff
from redis.retry import Retry

from kvcore.errors import StoreConfigError
from kvcore.stores import Store

from ._errors import translate
from ._options import RedisTarget, parse_redis_url
from ._packer import PartsPacker, supports_packer
from ._probe import probe_redis

#: One retry on a fresh connection after a connection error (pooled sockets go stale
#: when a server restarts); none after a timeout, which would only double the wait.
_ONE_RECONNECT = Retry(NoBackoff(), 1, supported_errors=(rx.ConnectionError,))

__all__ = ["RedisStore"]

_CHUNK = 10000


class RedisStore(Store):
    """A Redis server as a block store."""

    name = "redis"
    schemes = ("redis", "rediss")

    def __init__(self, target: RedisTarget) -> None:
        super().__init__()
        self._target = target
        host, port = target.nodes[0]
        kwargs = dict(target.client_kwargs)
        max_connections = kwargs.pop("max_connections")
        tls = kwargs.pop("ssl", False)
        if supports_packer():
            # Values leave from the arrays' own memory (see _packer); without the option
            # they are joined into one bytes object first, which works as well.
            kwargs["command_packer"] = PartsPacker()
            self.accepts_parts = True
        pool = redis.ConnectionPool(
            connection_class=redis.SSLConnection if tls else redis.Connection,
            host=host, port=port, retry=_ONE_RECONNECT, max_connections=max_connections,
            **kwargs)
        self._client = redis.Redis(connection_pool=pool)
        #: Typical value size seen by reads, for sizing MGET windows (a guess at first).
        self._value_size = 64 << 10

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisStore:
        target = parse_redis_url(url, options)
        if target.cluster:
            raise StoreConfigError(f"{target.redacted} is a Redis Cluster URL; "
                                   "RedisClusterStore opens it")
        return cls(target)

    @classmethod
    def probe(cls) -> None:
        probe_redis()

    @property
    def url(self) -> str:
        return self._target.redacted

    @property
    def client(self) -> redis.Redis:
        """The redis-py client (for tests and tools; the store owns it)."""
        return self._client

    def _put(self, items: list[tuple[str, Any]]) -> None:
        ttl = self._target.ttl or None
        with translate(self.url, "SET"):
            for start in range(0, len(items), _CHUNK):
                pipe = self._client.pipeline(transaction=False)
                for key, value in items[start:start + _CHUNK]:
                    pipe.set(key, value, ex=ttl)
                pipe.execute()

    def _get(self, keys: list[str]) -> list[bytes | None]:
        # One MGET per window of about `read_window` bytes (by the sizes seen so far):
        # a single reply of tens of MiB makes the server's output buffer and the
        # client's reader buffer grow through fresh memory, and measured 1.4x slower
        # than 4 MiB windows; a run that fits one window is one round trip.
        step = max(1, min(_CHUNK, self._target.read_window // max(1, self._value_size)))
        with translate(self.url, "MGET"):
            out: list[bytes | None] = []
            for start in range(0, len(keys), step):
                out.extend(self._client.mget(keys[start:start + step]))
        found = [len(v) for v in out if v is not None]
        if found:
            self._value_size = max(1, sum(found) // len(found))
        return out

    def _exists(self, keys: list[str]) -> list[bool]:
        with translate(self.url, "EXISTS"):
            out: list[bool] = []
            for start in range(0, len(keys), _CHUNK):
                pipe = self._client.pipeline(transaction=False)
                for key in keys[start:start + _CHUNK]:
                    pipe.exists(key)
                out.extend(bool(n) for n in pipe.execute())
            return out

    def _delete(self, keys: list[str]) -> int:
        with translate(self.url, "DEL"):
            return sum(int(self._client.delete(*keys[start:start + _CHUNK]))
                       for start in range(0, len(keys), _CHUNK))

    def _close(self) -> None:
        self._client.close()
        self._client.connection_pool.disconnect()
