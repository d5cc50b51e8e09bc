"""The contract classes.  Subclass them in your own ``test_*.py``::

    import pytest
    from kvcore_conformance.suite import ConformanceSuite

    @pytest.fixture
    def kvcore_backend():
        from kv_mybackend import MyBackend
        return MyBackend()

    class TestMyBackend(ConformanceSuite):
        expected_failures = {"test_swap_round_trip_is_bit_identical": "swap lands in 0.3"}

:class:`ConformanceSuite` is all of them; the single classes let you run a part.
"""

from __future__ import annotations

from ._base import ContractTests
from ._harness import Harness
from .backend_arrays import BackendArraysContract
from .backend_ops import BackendOpsContract, BulkOperationsContract
from .bits import BitPatternContract
from .codecs import CodecContract
from .groups import LayerGroupContract
from .handles import HandleContract
from .manager import ManagerContract
from .sharing import PrefixSharingContract, StatsContract, SwapContract
from .stateful import StatefulContract, make_machine
from .tables import BlockTableContract
from .threads import ThreadSafetyContract

__all__ = [
    "BackendArraysContract",
    "BackendOpsContract",
    "BitPatternContract",
    "BlockTableContract",
    "BulkOperationsContract",
    "CodecContract",
    "ConformanceSuite",
    "ContractTests",
    "HandleContract",
    "Harness",
    "LayerGroupContract",
    "ManagerContract",
    "PrefixSharingContract",
    "StatefulContract",
    "StatsContract",
    "SwapContract",
    "ThreadSafetyContract",
    "make_machine",
]


class ConformanceSuite(CodecContract, LayerGroupContract, StatefulContract,
                       ThreadSafetyContract, StatsContract, SwapContract,
                       PrefixSharingContract, ManagerContract, HandleContract,
                       BlockTableContract, BitPatternContract, BackendOpsContract):
    """The whole contract in one class.

    pytest runs inherited tests base-last-first, so the bases are listed in reverse:
    the backend's own operations run first, then the bit patterns, then what the
    manager builds on them, the stateful test, then layer groups and quantized codecs
    (areas added later, listed last), the order the clauses are listed in (so the first
    failure names the operation at fault).
    """
