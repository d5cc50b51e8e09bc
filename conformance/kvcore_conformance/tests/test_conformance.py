"""Every contract class, collected against the backend(s) named with ``--kv-backend``.

One test class per area, so the report groups failures by the part of the contract
they break.  The classes run in the order below, the order the clauses are listed in:
what every later test builds on comes first, so the first failure names the culprit.
"""

from __future__ import annotations

from kvcore_conformance.suite import (
    BackendOpsContract,
    BitPatternContract,
    BlockTableContract,
    CodecContract,
    HandleContract,
    LayerGroupContract,
    ManagerContract,
    PrefixSharingContract,
    StatefulContract,
    StatsContract,
    SwapContract,
    ThreadSafetyContract,
)


class TestBackendOps(BackendOpsContract):
    pass


class TestBitPatterns(BitPatternContract):
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


class TestLayerGroups(LayerGroupContract):
    pass


class TestCodecs(CodecContract):
    pass
