"""kvcore plugin entry point: declares the Redis stores without importing redis-py."""

from __future__ import annotations

import kvcore
from kvcore.stores import STORE_API_VERSION, StoreSpec

_HINT = 'pip install "kvcore[redis]"'


@kvcore.hookimpl
def kvcore_stores() -> list[StoreSpec]:
    return [
        StoreSpec(
            name="redis",
            schemes=("redis", "rediss"),
            load="kv_redis._single:RedisStore",
            api_version=STORE_API_VERSION,
            requires=("redis",),
            description="one Redis server: MGET / pipelined SET, short timeouts, AUTH, TLS",
            install_hint=_HINT,
            extra={"url": "redis[s]://[[user]:password@]host[:port][/db][?timeout=0.5&ttl=0]"},
        ),
        StoreSpec(
            name="redis-cluster",
            schemes=("redis+cluster", "rediss+cluster"),
            load="kv_redis._cluster:RedisClusterStore",
            api_version=STORE_API_VERSION,
            requires=("redis",),
            description="Redis Cluster: batches split per master, run in parallel; a "
                        "dead master costs its keys only",
            install_hint=_HINT,
            extra={"url": "redis[s]+cluster://[[user]:password@]host:port[,host:port...]"},
        ),
    ]
