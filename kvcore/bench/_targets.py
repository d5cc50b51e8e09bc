"""What ``kvcore bench --check`` guards: the targets kvcore has met.

A target that has never been met (see docs/benchmarks.md, "Why the missed targets
are missed") cannot regress; failing every run on it would only teach people to
ignore ``--check``.  So ``--check`` fails on a *regression*: a target missed now that
was met before, either in the runs recorded here (:data:`RECORDED_MET`, updated with
docs/benchmarks.md when a target is first met) or, with ``--baseline FILE``, in an
earlier ``kvcore bench --json`` run on the same machine.  Targets missed and never
met are listed as known misses.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["RECORDED_MET", "Verdict", "judge", "met_in"]

#: (backend, workload, figure) whose target was met in every full run recorded in
#: docs/benchmarks.md (2 CPUs, 2026-11-30 and the two runs of 2026-12-01).
RECORDED_MET: frozenset[tuple[str, str, str]] = frozenset({
    *((b, "read", "read_GBps") for b in ("numpy", "torch", "jax")),
    *((b, "read", "page_table_read_GBps") for b in ("numpy", "torch", "jax")),
    *((b, "blocks", f) for b in ("numpy", "torch", "jax")
      for f in ("alloc_free_us_per_block", "append_us_per_token")),
    *((b, "fork", "blocks_copied_per_child") for b in ("numpy", "torch", "jax")),
})


def met_in(doc: dict[str, Any]) -> frozenset[tuple[str, str, str]]:
    """The targets a ``kvcore bench --json`` document says were met."""
    return frozenset((t["backend"], t["workload"], t["figure"])
                     for t in doc.get("targets", []) if t.get("met") is True)


def load_baseline(path: str) -> frozenset[tuple[str, str, str]]:
    """The met targets of an earlier ``--json`` run saved at ``path``."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"--baseline {path}: not a readable kvcore bench --json document "
                         f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(doc, dict) or doc.get("kvcore_bench") != 1 or not doc.get("targets_judged"):
        raise ValueError(f"--baseline {path}: not the --json output of a full (not --quick) "
                         "kvcore bench run")
    return met_in(doc)


class Verdict:
    """Targets of one run sorted into met, regressed (met before, missed now) and known
    misses (missed now and never met before)."""

    def __init__(self, targets: Iterable[dict[str, Any]],
                 met_before: frozenset[tuple[str, str, str]]) -> None:
        self.met: list[dict[str, Any]] = []
        self.regressed: list[dict[str, Any]] = []
        self.known_misses: list[dict[str, Any]] = []
        for t in targets:
            key = (t["backend"], t["workload"], t["figure"])
            if t["met"]:
                self.met.append(t)
            elif key in met_before:
                self.regressed.append(t)
            else:
                self.known_misses.append(t)

    def lines(self) -> list[str]:
        def name(t: dict[str, Any]) -> str:
            return f"{t['backend']}/{t['workload']}/{t['figure']} (target {t['target']})"
        out = [f"kvcore bench --check: REGRESSION {name(t)}: met before, missed now"
               for t in self.regressed]
        out += [f"kvcore bench --check: known miss {name(t)}: never met yet"
                for t in self.known_misses]
        out.append(f"kvcore bench --check: {len(self.met)} met, {len(self.regressed)} "
                   f"regressed, {len(self.known_misses)} known misses")
        return out


def judge(doc: dict[str, Any], met_before: frozenset[tuple[str, str, str]] | None = None
          ) -> Verdict:
    """Sort the targets of ``doc`` against ``met_before`` (default: :data:`RECORDED_MET`)."""
    return Verdict(doc.get("targets", []), RECORDED_MET if met_before is None else met_before)
