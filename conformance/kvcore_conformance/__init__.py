"""kvcore-conformance: the suite that proves a kvcore backend keeps the contract.

Three ways to run it:

* ``kvcore conformance NAME [NAME...]`` (or :func:`run` from Python) runs the whole
  suite once per installed backend and returns a non-zero status on any failure;
* ``pytest --pyargs kvcore_conformance --kv-backend NAME`` does the same through
  pytest, so every pytest option works;
* subclass the contract classes of :mod:`kvcore_conformance.suite` in your own test
  files (override the ``kvcore_backend`` fixture, list known gaps in
  ``expected_failures``).

Importing this package is cheap on purpose: the pytest plugin lives in it, and
installing the distribution must not slow down or change anyone else's test run.
Everything heavier is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from ._clauses import Clause, ContractViolation
    from ._runner import run

__all__ = ["Clause", "ContractViolation", "__version__", "run"]


def __getattr__(name: str) -> Any:
    # Lazy: `run` pulls in kvcore and the clause helpers only when somebody asks.
    if name == "run":
        from ._runner import run
        return run
    if name in ("Clause", "ContractViolation"):
        from . import _clauses
        return getattr(_clauses, name)
    raise AttributeError(f"module 'kvcore_conformance' has no attribute {name!r}")
