"""The clause-by-clause report: a table at the end of the run, and JSON for CI.

A backend author reads this first: which promises the backend keeps, which it
breaks, which were skipped and why, and which broken clause to fix first (the first
failure of the run, since the suite runs the clauses in dependency order).

Each test of the suite covers one clause (``@covers``); a failing test is counted
against the clause its :class:`ContractViolation` names, which may be another one (a
scatter that loses rows, seen while testing something else, is ``backend.scatter``'s
failure), and the clause it covers is then *incomplete*: not shown broken, but not
shown kept either.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest

from ._clauses import CLAUSES, ContractViolation
from ._version import __version__

__all__ = ["JSON_SCHEMA_VERSION", "ClauseReport"]

#: Bumped when the JSON document changes incompatibly.
JSON_SCHEMA_VERSION = 1
_RESULT_ORDER = ("FAILED", "incomplete", "passed", "xfail", "skipped", "not run")
#: Skips of one parameter value (a dtype, a device) rather than of a whole clause.
_PARAMETER_TAGS = frozenset({"dtypes", "device_types", "swap_device_types"})


@dataclass
class _Test:
    """What happened to one test of the suite."""

    nodeid: str
    backend: str | None  # None: a test that needs no backend counts for every backend
    covers: str | None
    outcome: str = "not run"  # passed / failed / skipped / xfail / not run
    violated: str | None = None
    message: str = ""
    reason: str = ""


@dataclass
class ClauseResult:
    """One clause's tests on one backend."""

    id: str
    text: str
    collected: int = 0
    passed: int = 0
    failed: list[_Test] = field(default_factory=list)
    skipped: list[_Test] = field(default_factory=list)
    xfailed: list[_Test] = field(default_factory=list)
    incomplete: list[_Test] = field(default_factory=list)

    @property
    def result(self) -> str:
        if self.failed:
            return "FAILED"
        if self.incomplete:
            return "incomplete"
        if self.passed:
            return "passed"
        if self.xfailed:
            return "xfail"
        if self.skipped:
            return "skipped"
        return "not run"

    def skip_reasons(self) -> list[str]:
        """Distinct reasons, the telling ones first: a skip of the whole clause (no
        DLPack, no pinned memory) before the per-dtype / per-device ones every
        parametrized clause has."""
        return sorted({t.reason for t in self.skipped},
                      key=lambda r: (_tag(r) in _PARAMETER_TAGS, r))

    def note(self) -> str:
        if self.failed:
            return self.failed[0].message
        if self.incomplete:
            first = self.incomplete[0]
            return f"stopped at [{first.violated}] in {_short_id(first.nodeid).split('[')[0]}"
        if self.xfailed:
            return f"expected failure: {self.xfailed[0].reason}"
        reasons = self.skip_reasons()
        if reasons and not self.passed:
            return reasons[0] + (f" (+{len(reasons) - 1} more)" if len(reasons) > 1 else "")
        telling = sorted({_tag(r) for r in reasons} - _PARAMETER_TAGS)
        if telling:  # per-dtype / per-device skips are summed up under the table
            return "some skipped: " + ", ".join(telling)
        if not self.collected:
            return "no test of this clause was collected (deselected?)"
        if self.result == "not run":
            return "not reached (the run stopped early)"
        return ""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "text": self.text, "result": self.result,
            "tests": {"collected": self.collected, "passed": self.passed,
                      "failed": len(self.failed), "skipped": len(self.skipped),
                      "xfailed": len(self.xfailed), "incomplete": len(self.incomplete)},
            "skip_reasons": self.skip_reasons(),
            "failures": [{"test": t.nodeid, "message": t.message} for t in self.failed],
            "incomplete": [{"test": t.nodeid, "failed_on": t.violated} for t in self.incomplete],
        }


def _short_id(nodeid: str) -> str:
    return nodeid.rsplit("::", 1)[-1]


def _tag(reason: str) -> str:
    """``dtypes`` of a ``[capability dtypes] ...`` skip reason, or its first words."""
    if reason.startswith("[") and "]" in reason:
        return reason[1:reason.index("]")].removeprefix("capability ")
    return reason[:40]


def _first_line(exc: BaseException) -> str:
    """The detail line of a violation (the line after the clause text); for data that
    differs, what differs comes first and where second (the table shows the start)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    line = lines[1] if len(lines) > 1 else (lines[0] if lines else type(exc).__name__)
    for marker in (": data differs from the dense reference. ", ": bits differ. "):
        where, found, what = line.partition(marker)
        if found:
            return f"{what} (in {where})"
    return line


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return text.removeprefix("Skipped: ")


class ClauseReport:
    """pytest plugin object: collects outcomes per backend and clause, prints the table
    and writes the JSON document (``--kv-json PATH``)."""

    def __init__(self, backends: list[str], json_path: str | None = None) -> None:
        self.backends = list(backends)
        #: No --kv-backend: the backends are named as the runs' kvcore_backend fixtures
        #: show them (every test then counts for each: one backend per run in practice).
        self.observe = not backends
        self.json_path = json_path
        self.tests: dict[str, _Test] = {}
        self.order: list[str] = []  # node ids in the order their outcome was known

    # --- collecting -------------------------------------------------------------------

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        for item in session.items:
            callspec = getattr(item, "callspec", None)
            backend = callspec.params.get("kvcore_backend_name") if callspec else None
            clause = getattr(getattr(item, "obj", None), "kvcore_clause", None)
            if backend is None and clause is None:
                continue  # not a test of the suite
            self.tests[item.nodeid] = _Test(item.nodeid, None if backend is None else str(backend),
                                            getattr(clause, "id", None))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
        report = yield
        if self.observe and call.when == "setup":
            backend = getattr(item, "funcargs", {}).get("kvcore_backend")
            name = getattr(backend, "name", None)
            if isinstance(name, str) and name not in self.backends:
                self.backends.append(name)
        test = self.tests.get(item.nodeid)
        if test is not None and call.excinfo is not None and report.failed:
            exc = call.excinfo.value
            if isinstance(exc, ContractViolation):
                test.violated, test.message = exc.clause.id, _first_line(exc)
            elif not test.message:
                test.message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        test = self.tests.get(report.nodeid)
        if test is None:
            return
        if report.failed:
            if test.outcome != "failed":
                self.order.append(report.nodeid)
            test.outcome = "failed"
            test.violated = test.violated or test.covers
        elif report.skipped and hasattr(report, "wasxfail"):
            test.outcome, test.reason = "xfail", str(report.wasxfail)
        elif report.skipped and test.outcome == "not run":
            test.outcome, test.reason = "skipped", _skip_reason(report)
        elif report.when == "call" and report.passed and test.outcome == "not run":
            test.outcome = "passed"

    # --- results --------------------------------------------------------------------

    def results(self, backend: str) -> list[ClauseResult]:
        """One :class:`ClauseResult` per known clause (and any other id seen), in the
        order of :data:`CLAUSES`."""
        out = {cid: ClauseResult(cid, c.text) for cid, c in CLAUSES.items()}
        for test in self.tests.values():
            if test.backend not in (backend, None):
                continue
            for cid in filter(None, (test.covers, test.violated)):
                out.setdefault(cid, ClauseResult(cid, "(not a registered clause)"))
            if test.covers:
                out[test.covers].collected += 1
            if test.outcome == "failed":
                if test.violated:
                    out[test.violated].failed.append(test)
                if test.covers and test.violated != test.covers:
                    out[test.covers].incomplete.append(test)
            elif test.covers and test.outcome == "passed":
                out[test.covers].passed += 1
            elif test.covers and test.outcome == "skipped":
                out[test.covers].skipped.append(test)
            elif test.covers and test.outcome == "xfail":
                out[test.covers].xfailed.append(test)
        return list(out.values())

    def first_failure(self, backend: str) -> _Test | None:
        for nodeid in self.order:
            test = self.tests[nodeid]
            if test.backend in (backend, None):
                return test
        return None

    def document(self, backend: str, exitstatus: int | None = None) -> dict[str, Any]:
        """The JSON document of one backend's run."""
        results = self.results(backend)
        counts = {r: sum(1 for c in results if c.result == r) for r in _RESULT_ORDER}
        first = self.first_failure(backend)
        return {
            "backend": backend,
            "passed": counts["FAILED"] == 0 and counts["incomplete"] == 0 and counts["passed"] > 0,
            "summary": {"clauses": len(results), "passed": counts["passed"],
                        "failed": counts["FAILED"], "incomplete": counts["incomplete"],
                        "skipped": counts["skipped"], "xfail": counts["xfail"],
                        "not_run": counts["not run"]},
            "first_failure": None if first is None else {
                "clause": first.violated, "test": first.nodeid, "message": first.message},
            "clauses": [c.to_json() for c in results],
            **({"exit_status": exitstatus} if exitstatus is not None else {}),
        }

    # --- output ---------------------------------------------------------------------

    def table_lines(self, backend: str, width: int = 100) -> list[str]:
        results = self.results(backend)
        idw = max(len(c.id) for c in results)
        head = f"{'clause':<{idw}}  {'result':<10}  pass  fail  skip  note"
        lines = [head]
        for c in results:
            row = (f"{c.id:<{idw}}  {c.result:<10}  {c.passed:>4}  "
                   f"{len(c.failed) + len(c.incomplete):>4}  {len(c.skipped):>4}  ")
            note = c.note()
            room = max(80, width - len(row))
            lines.append(row + (note if len(note) <= room else note[:room - 3] + "..."))
        counts = {r: sum(1 for c in results if c.result == r) for r in _RESULT_ORDER}
        lines.append(f"{len(results)} clauses: " + ", ".join(
            f"{n} {r}" for r, n in counts.items() if n))
        reasons: dict[str, int] = {}
        for c in results:
            for t in c.skipped:
                reasons[t.reason] = reasons.get(t.reason, 0) + 1
        for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
            lines.append(f"skipped ({n} test{'s' if n != 1 else ''}): {reason}")
        first = self.first_failure(backend)
        if first is not None:
            lines.append(f"first broken clause: [{first.violated}] in {first.nodeid}; fix it "
                         "first, later failures may follow from it")
        return lines

    def pytest_terminal_summary(self, terminalreporter: Any, exitstatus: int,
                                config: pytest.Config) -> None:
        width = getattr(getattr(terminalreporter, "_tw", None), "fullwidth", 100)
        for backend in self.backends:
            terminalreporter.write_sep("=", f"kvcore conformance: backend {backend!r}, "
                                       "clause by clause")
            for line in self.table_lines(backend, max(width, 120)):
                terminalreporter.write_line(line)

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if not self.json_path:
            return
        doc = {"suite": "kvcore-conformance", "version": __version__,
               "schema": JSON_SCHEMA_VERSION, "exit_status": int(exitstatus),
               "backends": [self.document(b) for b in self.backends]}
        write_json(self.json_path, doc)


def write_json(path: str, doc: dict[str, Any]) -> None:
    """Write ``doc`` to ``path`` atomically (a reader never sees half a file)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


def merge(documents: Iterable[dict[str, Any]], exit_status: int) -> dict[str, Any]:
    """One document for several sessions' documents (``kvcore conformance A B``)."""
    backends: list[dict[str, Any]] = []
    for doc in documents:
        backends.extend(doc.get("backends", []))
    return {"suite": "kvcore-conformance", "version": __version__,
            "schema": JSON_SCHEMA_VERSION, "exit_status": exit_status, "backends": backends}
