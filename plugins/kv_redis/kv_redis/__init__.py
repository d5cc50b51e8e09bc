"""Redis and Redis Cluster stores for kvcore (``redis://``, ``rediss://``,
``redis+cluster://``, ``rediss+cluster://``).

Open them through kvcore: ``kvcore.stores.open_store("redis://127.0.0.1:6379/0")``.
``RedisStore`` and ``RedisClusterStore`` are imported on first access, so importing
this package (as kvcore's plugin discovery does) does not import redis-py.
:mod:`kv_redis.testing` starts throwaway ``redis-server`` processes for tests.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RedisClusterStore", "RedisStore"]


def __getattr__(name: str) -> Any:
    if name == "RedisStore":
        from ._single import RedisStore
        return RedisStore
    if name == "RedisClusterStore":
        from ._cluster import RedisClusterStore
        return RedisClusterStore
    raise AttributeError(f"module 'kv_redis' has no attribute {name!r}")
