"""``kvcore conformance NAME...``: the whole suite, once per backend, from Python."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from ._backends import BackendProblem, resolve
from ._report import merge, write_json

__all__ = ["run"]

#: Exit status for a backend that cannot be tested at all (unknown, unavailable).
EXIT_BACKEND_PROBLEM = int(pytest.ExitCode.USAGE_ERROR)
_HYPOTHESIS_ENV = "HYPOTHESIS_STORAGE_DIRECTORY"


class _Outcomes:
    """Counts outcomes, so "everything skipped" is not mistaken for a pass."""

    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" and report.passed and not hasattr(report, "wasxfail"):
            self.passed += 1
        elif report.failed:
            self.failed += 1


@contextlib.contextmanager
def _hypothesis_home(directory: str) -> Iterator[None]:
    """Point hypothesis' storage (its constants cache) at ``directory`` for the run, so
    `kvcore conformance` writes no ``.hypothesis`` into the directory it was started in.

    Through the environment when hypothesis is not imported yet (importing it here
    would stop pytest from assertion-rewriting its plugin), else through its API.
    """
    module = sys.modules.get("hypothesis.configuration")
    if module is None:
        old_env = os.environ.get(_HYPOTHESIS_ENV)
        os.environ[_HYPOTHESIS_ENV] = directory
        try:
            yield
        finally:
            if old_env is None:
                os.environ.pop(_HYPOTHESIS_ENV, None)
            else:
                os.environ[_HYPOTHESIS_ENV] = old_env
            module = sys.modules.get("hypothesis.configuration")
            if module is not None:  # forget the directory it cached during the run
                module.set_hypothesis_home_dir(old_env)
        return
    old = module.storage_directory(intent_to_write=False).home_directory
    module.set_hypothesis_home_dir(directory)
    try:
        yield
    finally:
        module.set_hypothesis_home_dir(old)


def _split_json(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """Take ``--json`` (the document on stdout) or ``--json=PATH`` out of ``args``."""
    target, rest = None, []
    for arg in args:
        if arg == "--json":
            target = "-"
        elif arg.startswith("--json="):
            target = arg.split("=", 1)[1] or "-"
        else:
            rest.append(arg)
    return target, rest


def _run_one(name: str, pytest_args: Sequence[str]) -> int:
    try:
        resolve(name)
    except BackendProblem as exc:
        print(f"kvcore conformance: {exc}", file=sys.stderr)
        return EXIT_BACKEND_PROBLEM
    ini = Path(__file__).with_name("suite.ini")
    # Later sessions in this process find hypothesis imported already; pytest's warning
    # that it cannot assertion-rewrite it again is noise here.
    args = ["-c", str(ini), "--rootdir", str(ini.parent), "-p", "no:cacheprovider",
            "-W", "ignore::pytest.PytestAssertRewriteWarning",
            "--pyargs", "kvcore_conformance.tests", f"--kv-backend={name}", *pytest_args]
    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        args[:0] = ["-p", "kvcore_conformance"]  # load it through its entry point by name
    outcomes = _Outcomes()
    code = int(pytest.main(args, plugins=[outcomes]))
    if code == 0 and outcomes.passed == 0:
        print(f"kvcore conformance: no test ran against backend {name!r} (all skipped or "
              "deselected); that is not a pass", file=sys.stderr)
        return int(pytest.ExitCode.NO_TESTS_COLLECTED)
    return code


def run(names: Iterable[str], pytest_args: Sequence[str] = ()) -> int:
    """Run the whole conformance suite against each installed backend in ``names``.

    Each backend gets its own pytest session (its own report header, summary and
    clause table) under the suite's own configuration, whatever directory this is
    called from; extra ``pytest_args`` (``-x``, ``-k swap``, ``--kv-hypothesis-profile
    kvcore-thorough``) are passed to every session.  ``--json`` among them prints one
    JSON document with every backend's clause-by-clause results on stdout (the
    sessions' own output then goes to stderr); ``--json=PATH`` writes it to PATH.
    Returns 0 when every backend passed, else the first non-zero pytest exit status:
    1 tests failed, 4 backend unknown or unavailable (or a usage error), 5 no test ran.
    """
    names = [n for n in names if n]
    target, pytest_args = _split_json(pytest_args)
    if not names:
        print("kvcore conformance: name at least one backend (see `kvcore backends`)",
              file=sys.stderr)
        return EXIT_BACKEND_PROBLEM
    results: list[tuple[str, int]] = []
    documents: list[dict[str, Any]] = []
    out = sys.stdout
    with tempfile.TemporaryDirectory(prefix="kvcore-conformance-") as home, \
            _hypothesis_home(home), \
            contextlib.redirect_stdout(sys.stderr if target == "-" else sys.stdout):
        for i, name in enumerate(names):
            extra = [] if target is None else [f"--kv-json={Path(home) / f'report-{i}.json'}"]
            code = _run_one(name, [*pytest_args, *extra])
            results.append((name, code))
            if target is not None:
                documents.append(_document_of(Path(home) / f"report-{i}.json", name, code))
        if len(results) > 1 or any(code for _, code in results):
            # A run that failed reports on stderr, with the errors that explain it;
            # stdout keeps pytest's reports and, when everything passed, the summary.
            stream = sys.stderr if any(code for _, code in results) else sys.stdout
            sys.stdout.flush()
            print("\nkvcore conformance summary:", file=stream)
            for name, code in results:
                verdict = "passed" if code == 0 else f"FAILED (exit status {code})"
                print(f"  {name}: {verdict}", file=stream)
    status = next((code for _, code in results if code), 0)
    if target is not None:
        doc = merge(documents, status)
        if target == "-":
            json.dump(doc, out, indent=2)
            out.write("\n")
            out.flush()
        else:
            write_json(target, doc)
    return status


def _document_of(path: Path, name: str, code: int) -> dict[str, Any]:
    """The session's JSON document, with its exit status per backend; a backend whose
    session never wrote one (unknown, unavailable, usage error) gets a stub saying so."""
    if path.exists():
        doc = json.loads(path.read_text(encoding="utf-8"))
        for backend in doc.get("backends", []):
            backend["exit_status"] = code
        return doc
    return {"backends": [{"backend": name, "passed": False, "exit_status": code,
                          "error": "the backend could not be tested (see stderr)",
                          "summary": None, "first_failure": None, "clauses": []}]}
