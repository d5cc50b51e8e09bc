"""The store section of the conformance suite: prove a kvcore store keeps the contract.

Run it against any store URL::

    pytest --pyargs kvcore_conformance.stores --kv-store redis://127.0.0.1:6379/0
    pytest --pyargs kvcore_conformance.stores --kv-store file:///tmp/kvcore-test

or subclass :class:`StoreContract` in your own tests (override the
``kvcore_store_url`` fixture, and ``kvcore_store_options`` for passwords).  The
clauses are listed in :data:`STORE_CLAUSES`.

Importing this package is cheap on purpose: its pytest plugin lives in it and is
loaded into every pytest run where kvcore-conformance is installed, so the contract
(and numpy, kvcore) are imported only when asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._clauses import STORE_CLAUSES
    from .contract import StoreContract

__all__ = ["STORE_CLAUSES", "StoreContract"]


def __getattr__(name: str) -> Any:
    if name == "StoreContract":
        from .contract import StoreContract
        return StoreContract
    if name == "STORE_CLAUSES":
        from ._clauses import STORE_CLAUSES
        return STORE_CLAUSES
    raise AttributeError(f"module 'kvcore_conformance.stores' has no attribute {name!r}")
