"""The store section of the conformance suite: prove a kvcore store keeps the contract.

Run it against any store URL::

    pytest --pyargs kvcore_conformance.stores --kv-store redis://127.0.0.1:6379/0
    pytest --pyargs kvcore_conformance.stores --kv-store file:///tmp/kvcore-test

or subclass :class:`StoreContract` in your own tests (override the
``kvcore_store_url`` fixture, and ``kvcore_store_options`` for passwords).  The
clauses are listed in :data:`STORE_CLAUSES`.
"""

from __future__ import annotations

from ._clauses import STORE_CLAUSES
from .contract import StoreContract

__all__ = ["STORE_CLAUSES", "StoreContract"]
