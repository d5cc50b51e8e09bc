"""redis-py's exceptions as kvcore's: no library exception escapes a store call."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import redis.exceptions as rx

from kvcore.errors import StoreConnectionError, StoreTimeoutError

__all__ = ["translate", "is_redirect", "is_node_failure"]


@contextlib.contextmanager
def translate(url: str, what: str) -> Iterator[None]:
    """Turn a redis-py exception raised inside the block into a kvcore store error
    naming the (redacted) URL and the command."""
    try:
        yield
    except rx.TimeoutError as exc:
        raise StoreTimeoutError(f"store {url}: {what} timed out: {exc}") from exc
    except rx.ConnectionError as exc:  # includes AuthenticationError
        raise StoreConnectionError(f"store {url}: {what} failed: {type(exc).__name__}: "
                                   f"{exc}") from exc
    except rx.RedisError as exc:  # OOM, NOAUTH, READONLY, CLUSTERDOWN, ...
        raise StoreConnectionError(f"store {url}: {what} refused: {type(exc).__name__}: "
                                   f"{exc}") from exc
    except OSError as exc:  # a TLS file that cannot be read, a socket error
        raise StoreConnectionError(f"store {url}: {what} failed: {exc}") from exc


def is_redirect(result: object) -> bool:
    """A per-command cluster answer that means "ask elsewhere / later"."""
    return isinstance(result, (rx.MovedError, rx.AskError, rx.TryAgainError,
                               rx.ClusterDownError))


def is_node_failure(exc: BaseException) -> bool:
    return isinstance(exc, (rx.ConnectionError, rx.TimeoutError, OSError))
