"""The store contract, collected against the store(s) named with ``--kv-store``."""

from __future__ import annotations

from kvcore_conformance.stores import StoreContract


class TestStore(StoreContract):
    pass
