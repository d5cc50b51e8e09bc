"""The conformance suite's teeth: every planted bug fails the suite, and the first
failure of the run names the clause of the bug (not a clause that merely trips over
its consequences); the covering test of that clause fails on it too; a full run
keeps the failures on the clauses the bug touches.

The planted bugs live in ``tests/conformance_backends`` (never in a distribution):
at least one per class of bug the suite hunts, for numpy and, where the bug is
library-specific, for torch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

# Imported here once: pytester's inline runs drop every module imported during a run,
# and re-importing hypothesis and the suite twice per planted bug costs seconds each.
import kvcore_conformance.suite
import kvcore_conformance.tests.test_conformance  # noqa: F401
import pytest

from tests.conformance_backends.broken import BROKEN, register_all, unregister_all

pytest_plugins = ["pytester"]

SUITE = ["-p", "no:cacheprovider", "--pyargs", "kvcore_conformance.tests",
         "--kv-hypothesis-profile", "kvcore-quick"]
CLAUSE = re.compile(r"contract clause \[([^\]]+)\] broken")

#: Every class of bug issue 11 lists, by the clause that must catch it first.
CLASSES = {
    "bit patterns": {"bits.numpy-roundtrip", "bits.scatter-gather", "bits.copy-blocks",
                     "bits.transfer-blocks"},
    "orders the manager never produces": {"backend.gather.order", "backend.scatter"},
    "sizes the default pools never reach": {"backend.large-pool"},
    "fresh state": {"backend.fresh-pools"},
    "caches inside a backend": {"backend.fresh-reads"},
    "overwrite semantics": {"backend.scatter.overwrite"},
    "promises around arrays": {"backend.asarray", "backend.asarray.dlpack",
                               "backend.asarray.device", "backend.describe",
                               "backend.from-numpy", "backend.to-numpy", "backend.index-array"},
    "identity": {"backend.identity"},
    "API version 2": {"backend.returns-pool", "capabilities.mutable-pools", "backend.planes",
                      "backend.layer-forms", "backend.release-layer"},
    "layer groups": {"groups.sliding-window", "groups.latent", "groups.kv-widths",
                     "groups.cross"},
    "quantized codecs": {"codec.storage", "codec.round-trip", "codec.codes-exact"},
}

#: Full runs: besides its own clause, the clauses each of these must also fail, and
#: clauses that must still pass (the defect does not smear over unrelated ones).
FULL_RUNS = {
    "broken-cow-copy": ({"manager.fork-cow"}, {"backend.scatter", "handle.as-any"}),
    "broken-describe": ({"manager.no-silent-cast"}, {"backend.numpy-roundtrip", "backend.scatter"}),
    "broken-signed-zero": (set(), {"backend.scatter", "backend.gather.order", "manager.fork-cow"}),
    "broken-torch-scatter-adds": (set(), {"backend.scatter", "backend.gather.order",
                                          "bits.numpy-roundtrip", "table.errors"}),
    "broken-stale-cache": (set(), {"backend.gather.order", "backend.copy-blocks"}),
}


@pytest.fixture
def planted() -> Iterator[None]:
    names = register_all()
    yield
    unregister_all(names)


def _failures(reprec: pytest.HookRecorder) -> dict[str, str]:
    return {r.nodeid: r.longreprtext for r in reprec.getreports("pytest_runtest_logreport")
            if r.failed}


def _report(path: Path, name: str) -> dict:
    (doc,) = json.loads(path.read_text())["backends"]
    assert doc["backend"] == name
    return doc


def test_every_class_of_bug_has_a_planted_bug() -> None:
    caught = {bug.clause for bug in BROKEN.values()}
    for what, clauses in CLASSES.items():
        assert clauses <= caught, f"{what}: no planted bug for {sorted(clauses - caught)}"
    torch = [name for name, bug in BROKEN.items() if bug.backend.__module__.endswith("_torch")]
    # torch is installed in CI: its planted bugs must be there, not silently dropped.
    assert len(torch) >= 5, torch
    assert {BROKEN[n].clause for n in torch} >= {"backend.scatter.overwrite",
                                                 "bits.transfer-blocks", "backend.to-numpy"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BROKEN))
def test_planted_bug_fails_first_on_its_clause(pytester: pytest.Pytester, planted: None,
                                               name: str, tmp_path: Path) -> None:
    bug = BROKEN[name]
    path = tmp_path / "report.json"
    reprec = pytester.inline_run(*SUITE, "--kv-backend", name, "-x", "--kv-json", str(path))
    assert reprec.ret == pytest.ExitCode.TESTS_FAILED
    (text,) = _failures(reprec).values()  # -x: the first failure of the run
    assert CLAUSE.search(text).group(1) == bug.clause, text[-3000:]  # type: ignore[union-attr]
    first = _report(path, name)["first_failure"]
    assert first["clause"] == bug.clause, first
    # The test covering that clause fails on it as well, showing what it saw.
    reprec = pytester.inline_run(*SUITE, "--kv-backend", name, "-k", bug.test)
    hits = {n: t for n, t in _failures(reprec).items() if f"::{bug.test}[" in n}
    assert hits, f"{name}: {bug.test} did not fail; failures: {sorted(_failures(reprec))}"
    for nodeid, text in hits.items():
        assert f"contract clause [{bug.clause}] broken" in text, (nodeid, text[-2000:])
        assert "seen" in text or "raised" in text or "differ" in text, text[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FULL_RUNS))
def test_full_run_keeps_failures_on_the_clauses_the_bug_touches(
        pytester: pytest.Pytester, planted: None, name: str, tmp_path: Path) -> None:
    bug = BROKEN[name]
    also_failed, still_passed = FULL_RUNS[name]
    path = tmp_path / "report.json"
    reprec = pytester.inline_run(*SUITE, "--kv-backend", name, "--kv-json", str(path))
    assert reprec.ret == pytest.ExitCode.TESTS_FAILED
    failures = _failures(reprec)
    for nodeid, text in failures.items():  # every failure names a clause
        assert CLAUSE.search(text), f"{nodeid} failed without naming a clause:\n{text[-1500:]}"
    doc = _report(path, name)
    results = {c["id"]: c["result"] for c in doc["clauses"]}
    assert doc["first_failure"]["clause"] == bug.clause
    assert results[bug.clause] == "FAILED"
    for clause in also_failed:
        assert results[clause] == "FAILED", (clause, results[clause])
    for clause in still_passed:
        assert results[clause] == "passed", (clause, results[clause])
    assert not doc["passed"] and doc["summary"]["failed"] >= 1 + len(also_failed)
