"""redis-py's exceptions as kvcore's: no library exception escapes a store call."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import redis.exceptions as rx

from kvcore.errors import StoreConnectionError, StoreTimeoutError

__all__ = ["describe", "is_redirect", "translate"]


def describe(exc: BaseException) -> str:
    """An exception as one short printable line.  redis-py quotes the failing command
    of a pipeline, value included: that is K/V bytes in a log line, so it is cut."""
    text = str(exc)
    if "caused error: " in text:
        text = text.split("caused error: ", 1)[1]
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return f"{type(exc).__name__}: {text[:300]}"


@contextlib.contextmanager
def translate(url: str, what: str) -> Iterator[None]:
    """Turn a redis-py exception raised inside the block into a kvcore store error
    naming the (redacted) URL and the command."""
    try:
        yield
    except rx.TimeoutError as exc:
        raise StoreTimeoutError(f"store {url}: {what} timed out: {describe(exc)}") from exc
    except rx.ConnectionError as exc:  # includes AuthenticationError
        raise StoreConnectionError(f"store {url}: {what} failed: {describe(exc)}") from exc
    except rx.RedisError as exc:  # OOM, NOAUTH, READONLY, CLUSTERDOWN, ...
        raise StoreConnectionError(f"store {url}: {what} refused: {describe(exc)}") from exc
    except OSError as exc:  # a TLS file that cannot be read, a socket error
        raise StoreConnectionError(f"store {url}: {what} failed: {describe(exc)}") from exc


def is_redirect(result: object) -> bool:
    """A per-command cluster answer that means "ask elsewhere / later"."""
    return isinstance(result, (rx.MovedError, rx.AskError, rx.TryAgainError,
                               rx.ClusterDownError))
