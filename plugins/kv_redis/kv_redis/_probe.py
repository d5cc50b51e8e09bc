"""Can the Redis store run here?  redis-py recent enough; hiredis noted."""

from __future__ import annotations

from kvcore.errors import StoreUnavailableError

__all__ = ["probe_redis"]

MIN_REDIS_PY = (5, 0)


def probe_redis() -> None:
    """Raise :class:`~kvcore.errors.StoreUnavailableError` unless redis-py >= 5.0
    imports.  (hiredis only speeds up parsing; its absence is not an error.)"""
    try:
        import redis
    except ImportError as exc:
        raise StoreUnavailableError(f'redis-py is not installed ({exc}); pip install '
                                    f'"kvcore[redis]"') from exc
    version = getattr(redis, "__version__", "0")
    try:
        major_minor = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        major_minor = (0, 0)
    if major_minor < MIN_REDIS_PY:
        raise StoreUnavailableError(f"redis-py {version} is too old; kvcore-redis needs "
                                    f">= {'.'.join(map(str, MIN_REDIS_PY))}")
