"""Real ``redis-server`` processes for the store tests (import the fixtures you use).

``redis_server`` / ``redis_cluster`` are shared by a whole session (start-up costs
about a second); ``fresh_redis`` / ``fresh_cluster`` give a test its own processes to
stop, pause or kill.  Every server listens on a free 127.0.0.1 port and lives in a
temporary directory; all are stopped at the end.

When the binaries are missing the tests skip with the command that installs them,
except under ``CI=true``, where a store test must never skip: it fails instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["AUTH_PASSWORD", "fresh_cluster", "fresh_redis", "redis_auth_server", "redis_cluster",
           "redis_server", "require_redis", "skip_or_fail"]


def skip_or_fail(reason: str) -> None:
    """Skip, except in CI (``CI=true``), where every store test must run."""
    if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true and a store test cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def require_redis() -> None:
    try:
        from kv_redis.testing import INSTALL_HINT, find_redis_server
    except ImportError as exc:
        skip_or_fail(f"kvcore-redis is not installed ({exc}): pip install -e plugins/kv_redis")
        return
    if find_redis_server() is None:
        skip_or_fail(f"redis-server / redis-cli not found; run: {INSTALL_HINT}")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One redis-server for the session (tests use unique keys)."""
    require_redis()
    from kv_redis.testing import RedisServer
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


#: The password of ``redis_auth_server`` (random per session).
AUTH_PASSWORD = "kvcore-test-" + os.urandom(6).hex()


@pytest.fixture(scope="session")
def redis_auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One redis-server for the session that requires AUTH with ``AUTH_PASSWORD``."""
    require_redis()
    from kv_redis.testing import RedisServer
    with RedisServer(tmp_path_factory.mktemp("redis-auth"), password=AUTH_PASSWORD) as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One three-master Redis Cluster for the session."""
    require_redis()
    from kv_redis.testing import RedisClusterServers
    with RedisClusterServers(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture
def fresh_redis(tmp_path: Path) -> Iterator[object]:
    """A redis-server of the test's own (to stop, pause or kill)."""
    require_redis()
    from kv_redis.testing import RedisServer
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def fresh_cluster(tmp_path: Path) -> Iterator[object]:
    """A three-master cluster of the test's own (to kill a master in)."""
    require_redis()
    from kv_redis.testing import RedisClusterServers
    with RedisClusterServers(tmp_path / "cluster") as cluster:
        yield cluster
