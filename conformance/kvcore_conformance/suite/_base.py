"""The base every contract class derives from: known gaps via ``expected_failures``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

import pytest

from .._clauses import Clause, ContractViolation

__all__ = ["ContractTests", "covers"]

F = TypeVar("F", bound=Callable[..., Any])


def covers(item: Clause) -> Callable[[F], F]:
    """Mark a contract test with the clause it checks.

    Any exception other than a :class:`ContractViolation` (or pytest's skip / xfail)
    that escapes the test is reported as a violation of ``item``: a backend that blows
    up during an operation the contract allows breaks that clause too, and the report
    should say so rather than show a bare traceback.
    """
    def decorate(test: F) -> F:
        @functools.wraps(test)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return test(*args, **kwargs)
            except ContractViolation:
                raise
            except Exception as exc:
                raise ContractViolation(
                    item, f"  an operation the contract allows raised "
                    f"{type(exc).__name__}: {exc}") from exc
        wrapper.kvcore_clause = item  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]
    return decorate


class ContractTests:
    """Base of the contract classes.  Subclass one (or :class:`ConformanceSuite`, all of
    them) in a module named ``test_*.py`` with a class named ``Test*``.

    ``expected_failures`` maps a test name (``"test_gather_returns_rows_in_slot_order"``,
    or with its parameters, ``"test_gather_returns_rows_in_slot_order[numpy-float32-cpu]"``)
    to the reason it is known to fail.  Such a test is marked ``xfail(strict=True)``: it
    must keep failing, and once the backend is fixed the suite says to remove the entry.
    """

    expected_failures: ClassVar[Mapping[str, str]] = {}

    @pytest.fixture(autouse=True)
    def _kvcore_expected_failure(self, request: pytest.FixtureRequest) -> None:
        known = type(self).expected_failures
        if not known:
            return
        node = request.node
        reason = known.get(node.name, known.get(getattr(node, "originalname", node.name)))
        if reason is not None:
            request.applymarker(pytest.mark.xfail(
                reason=f"listed in {type(self).__name__}.expected_failures: {reason}",
                strict=True))
