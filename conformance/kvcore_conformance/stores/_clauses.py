"""The store contract, clause by clause, and the checks that name a clause when it breaks.

Kept apart from the backend clauses (``kvcore_conformance._clauses``) so the two
contracts evolve separately; the records are the same :class:`Clause` /
:class:`ContractViolation` types, so a failure reads the same way::

    contract clause [store.round-trip] broken: get returns exactly the bytes put ...
      seen:     ...
      expected: ...
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from .._clauses import Clause, ContractViolation

__all__ = ["STORE_CLAUSES", "check", "covers", "expect_raises", "fail"]

STORE_CLAUSES: dict[str, Clause] = {}
F = TypeVar("F", bound=Callable[..., Any])


def _c(id: str, text: str) -> Clause:
    item = Clause(id, text)
    STORE_CLAUSES[id] = item
    return item


IDENTITY = _c("store.identity", "a Store class names itself, lists the URL schemes it opens "
              "(including the one under test) and declares kvcore's STORE_API_VERSION")
ROUND_TRIP = _c("store.round-trip", "get returns exactly the bytes put, for every key of a "
                "batch, in the order asked; a key never written reads None")
BINARY = _c("store.binary-safe", "values of any bytes (all 256 byte values, empty, several "
            "MiB, bytearray, memoryview and ValueParts input) come back unchanged as bytes")
OVERWRITE = _c("store.overwrite", "a key written again holds the later value")
EXISTS = _c("store.exists", "exists answers True / False per key, in the order asked")
DELETE = _c("store.delete", "delete removes the keys, returns how many had a value, and "
            "ignores keys that have none")
BATCH = _c("store.batch", "empty batches are no-ops; a batch of 1,000 keys round-trips; a "
           "key asked twice in one get is answered twice")
KEYS = _c("store.keys", "keys outside 1..200 characters of [A-Za-z0-9._-] are refused with "
          "StoreKeyError and nothing is written")
SHARED = _c("store.shared", "a second store opened on the same URL (as another process "
            "would) sees the first one's writes and deletes")
THREADS = _c("store.threads", "one store called from 8 threads at once loses, mixes and "
             "tears nothing")
CLOSED = _c("store.closed", "close() is idempotent; afterwards every call raises "
            "StoreClosedError; a store is a context manager that closes on exit")
SECRETS = _c("store.secrets", "a store's url and repr never contain the password it was "
             "opened with")
CONNECTOR = _c("store.connector", "through a StoreConnector, offered blocks come back "
               "bit-identical from fetch_run, the leading run stops at the first miss, and a "
               "damaged value is a counted miss that gets deleted")


def _fmt(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 300 else text[:300] + "..."


def fail(item: Clause, detail: str, *, seen: Any = ..., expected: Any = ...) -> NoReturn:
    lines = [f"  {detail}"]
    if seen is not ...:
        lines.append(f"  seen:     {_fmt(seen)}")
    if expected is not ...:
        lines.append(f"  expected: {_fmt(expected)}")
    raise ContractViolation(item, "\n".join(lines))


def check(condition: bool, item: Clause, detail: str, *, seen: Any = ...,
          expected: Any = ...) -> None:
    if not condition:
        fail(item, detail, seen=seen, expected=expected)


def expect_raises(item: Clause, expected: type[BaseException], call: Callable[[], Any],
                  detail: str) -> BaseException:
    try:
        result = call()
    except expected as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - the wrong error breaks the clause too
        fail(item, f"{detail}: raised the wrong error", seen=f"{type(exc).__name__}: {exc}",
             expected=expected.__name__)
    fail(item, f"{detail}: nothing was raised", seen=f"returned {_fmt(result)}",
         expected=f"{expected.__name__} raised")


def covers(item: Clause) -> Callable[[F], F]:
    """Mark a contract test with its clause; any other exception escaping the test is
    reported as a violation of that clause (a store that blows up breaks it too)."""
    def decorate(test: F) -> F:
        @functools.wraps(test)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return test(*args, **kwargs)
            except ContractViolation:
                raise
            except Exception as exc:
                raise ContractViolation(item, f"  an operation the contract allows raised "
                                        f"{type(exc).__name__}: {exc}") from exc
        wrapper.kvcore_clause = item  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]
    return decorate
