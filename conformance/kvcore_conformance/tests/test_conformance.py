"""Every contract class, collected against the backend(s) named with ``--kv-backend``.

One test class per area, so the report groups failures by the part of the contract
they break.
"""

from __future__ import annotations

from kvcore_conformance.suite import (
    BackendOpsContract,
    BlockTableContract,
    HandleContract,
    ManagerContract,
    PrefixSharingContract,
    StatefulContract,
    StatsContract,
    SwapContract,
    ThreadSafetyContract,
)


class TestBackendOps(BackendOpsContract):
    pass


class TestBlockTables(BlockTableContract):
    pass


class TestHandles(HandleContract):
    pass


class TestManager(ManagerContract):
    pass


class TestPrefixSharing(PrefixSharingContract):
    pass


class TestSwap(SwapContract):
    pass


class TestStats(StatsContract):
    pass


class TestThreadSafety(ThreadSafetyContract):
    pass


class TestStateful(StatefulContract):
    pass
