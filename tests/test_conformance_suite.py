"""The conformance suite has teeth: it passes correct backends, fails each deliberately
broken one on the clause it breaks, is inert when not asked for, and works from an
installed wheel and through ``kvcore conformance``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

# Imported here once: pytester's inline runs drop every module imported during a run.
import kvcore_conformance.suite  # noqa: F401
import pytest

import kvcore
from tests.conformance_backends.broken import register_all, unregister_all

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
SUITE = ["-p", "no:cacheprovider", "--pyargs", "kvcore_conformance.tests"]
CLAUSE = re.compile(r"contract clause \[([^\]]+)\] broken")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "HYPOTHESIS"))}
    env.update(extra)
    return env


def _failures(reprec: pytest.HookRecorder) -> dict[str, str]:
    """Failed test node ids -> their failure text."""
    return {r.nodeid: r.longreprtext for r in reprec.getreports("pytest_runtest_logreport")
            if r.failed}


def _passed(reprec: pytest.HookRecorder) -> set[str]:
    return {r.nodeid for r in reprec.getreports("pytest_runtest_logreport")
            if r.passed and r.when == "call"}


@pytest.fixture
def registered() -> Iterator[list[str]]:
    """Every planted bug and refbits registered in code for the test's duration."""
    names = register_all()
    yield names
    unregister_all(names)


@pytest.mark.slow
def test_third_party_style_backend_passes_including_bfloat16(
        pytester: pytest.Pytester, registered: list[str]) -> None:
    reprec = pytester.inline_run(*SUITE, "--kv-backend", "refbits", "-rs")
    assert reprec.ret == pytest.ExitCode.OK, _failures(reprec)
    passed = _passed(reprec)
    assert any("bfloat16" in nodeid for nodeid in passed)
    skipped = [r for r in reprec.getreports("pytest_runtest_logreport") if r.skipped]
    dlpack = [r for r in skipped if "dlpack" in r.nodeid and "-cpu-" in r.nodeid]
    assert dlpack and all("[capability dlpack]" in str(r.longrepr) for r in dlpack)
    assert all("[capability " in str(r.longrepr) for r in skipped)


@pytest.mark.slow
def test_suite_passes_on_the_shipped_backends(pytester: pytest.Pytester) -> None:
    # torch is installed in CI: its absence is a failure here, not a skip.
    for name in ("numpy", "torch"):
        kvcore.get_backend(name)
    reprec = pytester.inline_run(*SUITE, "--kv-backend", "numpy,torch")
    assert reprec.ret == pytest.ExitCode.OK, _failures(reprec)
    passed = _passed(reprec)
    for name in ("numpy", "torch"):
        assert sum(f"{name}]" in n for n in passed) >= 100, f"too few {name} tests passed"
    assert any("bfloat16" in n and "torch]" in n for n in passed)


def test_undeclared_capabilities_are_skipped_with_their_reason(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(*SUITE, "--kv-backend", "numpy", "-rs", "-k",
                                "allocate_layer_is_zeroed or reads_export_dlpack")
    result.assert_outcomes(passed=5, skipped=7)
    out = result.stdout.str()
    assert ("[capability no_dlpack_dtypes] backend 'numpy': bfloat16 arrays do not speak "
            "DLPack: numpy's DLPack export and import refuse ml_dtypes.bfloat16") in out
    assert "[capability device_types] backend 'numpy' declares device_types=['cpu'], not 'cuda'" in out


def test_report_header_names_backend_distribution_api_and_capabilities(
        pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(*SUITE, "--kv-backend", "numpy", "--collect-only")
    result.stdout.fnmatch_lines([
        ("kvcore backend 'numpy' (kv_numpy._backend.NumpyBackend) from kvcore-numpy 0.1.0; "
         "array library 'numpy'; API version 2 (kvcore * provides 2)"),
        ("  declared capabilities: devices=cpu dtypes=float16,bfloat16,float32,uint8,int8 "
         "swap_to=cpu dlpack=yes pinned_memory=no codecs=float8_e4m3,float8_e5m2,int8"),
        "  suite: kvcore-conformance * at *"])


def test_unknown_backend_is_a_usage_error(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(*SUITE, "--kv-backend", "no-such-backend")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([("*cannot test backend 'no-such-backend': no backend named "
                                  "'no-such-backend'; installed backends: *")])


def test_expected_failures_mark_known_gaps_strictly(pytester: pytest.Pytester,
                                                    registered: list[str]) -> None:
    pytester.makeconftest("""
        import pytest, kvcore

        @pytest.fixture
        def kvcore_backend():
            return kvcore.get_backend("broken-gather-view")
    """)
    pytester.makepyfile(test_mine="""
        from kvcore_conformance.suite import BackendOpsContract

        class TestMine(BackendOpsContract):
            expected_failures = {
                "test_gather_returns_a_copy": "views until 0.2",
                "test_scatter_writes_only_the_given_slots": "not actually broken",
            }
    """)
    reprec = pytester.inline_run("-p", "no:cacheprovider", "-k", "gather_returns_a_copy or "
                                 "scatter_writes")
    reports = [r for r in reprec.getreports("pytest_runtest_logreport") if r.when == "call"]
    copy = [r for r in reports if "gather_returns_a_copy" in r.nodeid]
    scatter = [r for r in reports if "scatter_writes" in r.nodeid]
    assert copy and all(r.skipped and "views until 0.2" in r.wasxfail for r in copy)
    # An entry that no longer fails is an error (strict xfail): the list stays honest.
    assert scatter and all(r.failed and "XPASS(strict)" in str(r.longrepr) for r in scatter)


def test_plugin_is_inert_without_its_option(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_other="""
        import sys

        def test_a():
            assert 1 + 1 == 2

        def test_imports_nothing_heavy():
            assert "kvcore_conformance.plugin" in sys.modules  # it is installed and loaded
            heavy = [m for m in ("torch", "cupy", "kvcore", "numpy", "kvcore_conformance.suite",
                                 "kvcore_conformance._backends") if m in sys.modules]
            assert heavy == []

        def test_other_projects_fixture_wins(kvcore_backend):
            assert kvcore_backend == "theirs"
    """)
    pytester.makeconftest("""
        import pytest

        @pytest.fixture
        def kvcore_backend():
            return "theirs"
    """)
    with_plugin = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-v")
    without = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-v",
                                            "-p", "no:kvcore_conformance",
                                            "--deselect", "test_other.py::test_imports_nothing_heavy")
    with_plugin.assert_outcomes(passed=3)
    without.assert_outcomes(passed=2, deselected=1)
    assert "kvcore backend" not in with_plugin.stdout.str()
    collected = [line for line in with_plugin.stdout.lines if "::" in line]
    assert [c.replace("PASSED", "").split()[0] for c in collected] == [
        "test_other.py::test_a", "test_other.py::test_imports_nothing_heavy",
        "test_other.py::test_other_projects_fixture_wins"]


@pytest.mark.slow
def test_cli_runs_each_backend_from_a_plugin_distribution(tmp_path: Path) -> None:
    site = tmp_path / "site"
    info = site / "kvcore_refbits-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kvcore-refbits\n"
                                   "Version: 0.1.0\n")
    (info / "entry_points.txt").write_text(
        "[kvcore]\nrefbits = tests.conformance_backends.refbits_plugin\n")
    env = _env(PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]))
    report = tmp_path / "out" / "conformance.json"
    report.parent.mkdir()
    proc = subprocess.run([sys.executable, "-m", "kvcore", "conformance", "refbits", "broken-swap",
                           "--kv-hypothesis-profile", "kvcore-quick", f"--json={report}"],
                          check=False, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "kvcore backend 'refbits' (" in out and "from kvcore-refbits 0.1.0" in out
    assert "  refbits: passed" in out and "  broken-swap: FAILED (exit status 1)" in out
    assert "contract clause [backend.transfer-blocks] broken" in out
    assert "contract clause [manager.swap] broken" in out
    # The clause table closes each backend's run; the first broken clause is named.
    assert "kvcore conformance: backend 'broken-swap', clause by clause" in out
    assert re.search(r"^backend\.transfer-blocks +FAILED ", out, re.MULTILINE)
    assert re.search(r"^manager\.swap +FAILED ", out, re.MULTILINE)
    assert re.search(r"^table\.errors +passed ", out, re.MULTILINE)
    assert "first broken clause: [backend.transfer-blocks]" in out
    assert "warning" not in out.lower()
    assert not (tmp_path / ".hypothesis").exists() and not (tmp_path / ".pytest_cache").exists()
    doc = json.loads(report.read_text())
    assert doc["exit_status"] == 1 and doc["suite"] == "kvcore-conformance"
    runs = {b["backend"]: b for b in doc["backends"]}
    assert runs["refbits"]["passed"] and runs["refbits"]["exit_status"] == 0
    assert not runs["broken-swap"]["passed"] and runs["broken-swap"]["exit_status"] == 1
    assert runs["broken-swap"]["first_failure"]["clause"] == "backend.transfer-blocks"
    results = {c["id"]: c["result"] for c in runs["broken-swap"]["clauses"]}
    assert results["manager.swap"] == "FAILED" and results["backend.scatter"] == "passed"
    skipped = {c["id"]: c for c in runs["refbits"]["clauses"]}["bits.dlpack"]
    assert skipped["result"] == "skipped"
    assert any("[capability dlpack]" in r for r in skipped["skip_reasons"])


def test_json_on_stdout_keeps_stdout_clean(capsys: pytest.CaptureFixture[str]) -> None:
    from kvcore_conformance import run
    code = run(["numpy", "no-such-backend"], ["-q", "-k", "capabilities_are_well_formed",
                                             "--json"])
    out, err = capsys.readouterr()
    assert code == pytest.ExitCode.USAGE_ERROR
    doc = json.loads(out)  # nothing but the document on stdout
    numpy, missing = doc["backends"]
    assert (numpy["backend"], numpy["exit_status"], numpy["passed"]) == ("numpy", 0, True)
    result = {c["id"]: c["result"] for c in numpy["clauses"]}
    assert result["capabilities.well-formed"] == "passed"
    assert result["backend.scatter"] == "not run"
    assert (missing["backend"], missing["exit_status"], missing["clauses"]) == (
        "no-such-backend", 4, [])
    assert "clause by clause" in err and "cannot test backend 'no-such-backend'" in err


def test_clause_table_lists_every_clause_with_its_result(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(*SUITE, "--kv-backend", "numpy", "-k",
                                "registered_name or pinned or allocate_layer_is_zeroed")
    result.assert_outcomes(passed=4, skipped=4)
    out = result.stdout.str()
    assert "kvcore conformance: backend 'numpy', clause by clause" in out
    table = out[out.index("clause by clause"):]
    from kvcore_conformance._clauses import CLAUSES
    for cid in CLAUSES:  # every clause has its row, in order
        assert re.search(rf"^{re.escape(cid)} ", table, re.MULTILINE), cid
    assert re.search(r"^backend\.identity +passed +1 +0 +0 ", table, re.MULTILINE)
    assert re.search(r"^capabilities\.pinned-memory +skipped +0 +0 +1 +\[capability "
                     r"pinned_memory\] backend 'numpy' declares pinned_memory=False", table, re.MULTILINE)
    assert re.search(r"^backend\.allocate-layer +passed +3 +0 +3 *$", table, re.MULTILINE)
    assert re.search(r"^backend\.scatter +not run .*deselected", table, re.MULTILINE)
    assert "skipped (4 tests): [capability device_types]" not in table  # counted per test
    assert re.search(r"^skipped \(\d+ tests?\): \[capability device_types\] backend 'numpy' "
                     r"declares device_types=\['cpu'\], not 'cuda'", table, re.MULTILINE)


def test_run_refuses_unknown_backends_and_empty_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from kvcore_conformance import run
    assert run(["no-such-backend"]) == pytest.ExitCode.USAGE_ERROR
    assert "cannot test backend 'no-such-backend'" in capsys.readouterr().err
    assert run([]) == pytest.ExitCode.USAGE_ERROR
    # Deselecting everything is not a pass.
    assert run(["numpy"], ["-q", "-k", "no_test_has_this_name"]) == pytest.ExitCode.NO_TESTS_COLLECTED


@pytest.mark.slow
def test_suite_runs_from_an_installed_wheel(tmp_path: Path) -> None:
    dist, site, src = tmp_path / "dist", tmp_path / "site", tmp_path / "src"
    # Build from a copy: the build leaves build/ and egg-info behind, not in the checkout.
    shutil.copytree(ROOT / "conformance", src,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(dist), str(src)],
                   check=True, capture_output=True, timeout=300, cwd=tmp_path)
    wheel = next(dist.glob("kvcore_conformance-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "kvcore_conformance/suite.ini" in names
    assert any(n.endswith("entry_points.txt") for n in names)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), str(wheel)], check=True, capture_output=True, timeout=300)
    proc = subprocess.run([sys.executable, "-m", "pytest", "--pyargs", "kvcore_conformance",
                           "--kv-backend", "numpy", "--kv-hypothesis-profile", "kvcore-quick",
                           "-p", "no:cacheprovider"],
                          check=False, cwd=tmp_path, env=_env(PYTHONPATH=str(site)),
                          capture_output=True,
                          text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert f"suite: kvcore-conformance 0.1.0 at {site / 'kvcore_conformance'}" in out
    assert re.search(r"\d+ passed, \d+ skipped", out)
