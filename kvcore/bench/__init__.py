"""``kvcore bench``: the performance workloads, each against a same-process baseline.

Run ``kvcore bench --help``.  Programmatic use::

    from kvcore.bench import main
    main(["--workload", "blocks", "--json"])

This package is imported only by the ``bench`` sub-command: ``import kvcore`` never
loads it (nor matplotlib, which only ``--plot`` needs).
"""

from __future__ import annotations

from ._cli import WORKLOADS, main
from ._params import QUICK, BenchParams

__all__ = ["QUICK", "WORKLOADS", "BenchParams", "main"]
