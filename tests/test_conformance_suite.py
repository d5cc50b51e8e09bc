"""The conformance suite has teeth: it passes correct backends, fails each deliberately
broken one on the clause it breaks, is inert when not asked for, and works from an
installed wheel and through ``kvcore conformance``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import kvcore
from tests.conformance_backends.broken import BROKEN
from tests.conformance_backends.refbits import RefBitsBackend

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
    """Every broken backend and refbits registered in code for the test's duration."""
    names = []
    for cls in [entry[0] for entry in BROKEN.values()] + [RefBitsBackend]:
        kvcore.register_backend(cls, replace_existing=True)
        names.append(cls.name)
    yield names
    for name in names:
        kvcore.unregister_backend(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BROKEN))
def test_each_broken_backend_fails_on_the_clause_it_breaks(
        pytester: pytest.Pytester, registered: list[str], name: str) -> None:
    _, clause, test_name = BROKEN[name]
    reprec = pytester.inline_run(*SUITE, "--kv-backend", name,
                                 "--kv-hypothesis-profile", "kvcore-quick")
    failures = _failures(reprec)
    assert reprec.ret == pytest.ExitCode.TESTS_FAILED
    hits = {nodeid: text for nodeid, text in failures.items() if f"::{test_name}[" in nodeid}
    assert hits, f"{name}: {test_name} did not fail; failures were {sorted(failures)}"
    for nodeid, text in hits.items():
        assert f"contract clause [{clause}] broken" in text, (nodeid, text[-2000:])
        assert "seen:" in text or "raised" in text, text[-2000:]  # values are shown
    # Every failure names a clause: none is a bare traceback.
    for nodeid, text in failures.items():
        assert CLAUSE.search(text), f"{nodeid} failed without naming a clause:\n{text[-1500:]}"
    # Precision: the defect does not smear over unrelated clauses.
    assert any("::test_handle_class_and_as_any[" in n or "test_plain_tables_refuse" in n
               for n in _passed(reprec)), "unrelated clauses should still pass"


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
        assert sum(f"{name}]" in n for n in passed) >= 60, f"too few {name} tests passed"
    assert any("bfloat16" in n and "torch]" in n for n in passed)


def test_undeclared_capabilities_are_skipped_with_their_reason(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(*SUITE, "--kv-backend", "numpy", "-rs", "-k",
                                "allocate_layer_is_zeroed")
    result.assert_outcomes(passed=2, skipped=4)
    out = result.stdout.str()
    assert ("[capability dtypes] backend 'numpy' does not support bfloat16: numpy has no "
            "bfloat16 dtype") in out
    assert "[capability device_types] backend 'numpy' declares device_types=['cpu'], not 'cuda'" in out


def test_report_header_names_backend_distribution_api_and_capabilities(
        pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(*SUITE, "--kv-backend", "numpy", "--collect-only")
    result.stdout.fnmatch_lines([
        ("kvcore backend 'numpy' (kv_numpy._backend.NumpyBackend) from kvcore-numpy 0.1.0; "
         "array library 'numpy'; API version 2 (kvcore * provides 2)"),
        ("  declared capabilities: devices=cpu dtypes=float16,float32 swap_to=cpu dlpack=yes "
         "pinned_memory=no unsupported: bfloat16 (numpy has no bfloat16 dtype)"),
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
    proc = subprocess.run([sys.executable, "-m", "kvcore", "conformance", "refbits", "broken-swap",
                           "--kv-hypothesis-profile", "kvcore-quick"],
                          check=False, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "kvcore backend 'refbits' (" in out and "from kvcore-refbits 0.1.0" in out
    assert "  refbits: passed" in out and "  broken-swap: FAILED (exit status 1)" in out
    assert "contract clause [manager.swap] broken" in out
    assert "warning" not in out.lower()
    assert not (tmp_path / ".hypothesis").exists() and not (tmp_path / ".pytest_cache").exists()


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
