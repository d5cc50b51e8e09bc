"""KVCORE_REQUIRE_GPU=1 turns every skip of a GPU test into a failure (the hook in
tests/conftest.py), run with pytester on a copy of the real conftest."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py").read_text()
TESTS = """
import pytest

@pytest.mark.gpu
@pytest.mark.skipif(True, reason="torch cannot use CUDA here: no driver")
def test_gpu_skipped_by_marker():
    pass

@pytest.mark.gpu
def test_gpu_skipped_inside():
    pytest.skip("cupy is not installed")

@pytest.mark.gpu
def test_gpu_that_runs():
    pass

def test_cpu_skip_stays_a_skip():
    pytest.skip("not about GPUs")

@pytest.mark.gpu
def test_needs_two_gpus():
    pytest.skip("needs 2 GPUs, this machine has 1")
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs a GPU\n")
    pytester.makepyfile(test_some=TESTS)
    return pytester


def test_without_the_switch_gpu_skips_are_skips(project, monkeypatch):
    monkeypatch.delenv("KVCORE_REQUIRE_GPU", raising=False)
    result = project.runpytest_inprocess("-rs")
    result.assert_outcomes(passed=1, skipped=4)


def test_with_the_switch_gpu_skips_fail_with_their_reason(project, monkeypatch):
    monkeypatch.setenv("KVCORE_REQUIRE_GPU", "1")
    result = project.runpytest_inprocess("-rA")
    # A skipif marker skips at setup, so that one is reported as an error at setup.
    # The two-GPU test still skips: one GPU is required, the machine has one.
    result.assert_outcomes(passed=1, skipped=2, failed=1, errors=1)
    result.stdout.fnmatch_lines([
        "*KVCORE_REQUIRE_GPU=1 but this GPU test was skipped: torch cannot use CUDA here: no driver*",
        "*KVCORE_REQUIRE_GPU=1 but this GPU test was skipped: cupy is not installed*",
    ])
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_requiring_two_gpus_fails_the_two_gpu_test_too(project, monkeypatch):
    monkeypatch.setenv("KVCORE_REQUIRE_GPU", "2")
    result = project.runpytest_inprocess()
    result.assert_outcomes(passed=1, skipped=1, failed=2, errors=1)
    result.stdout.fnmatch_lines(["*this GPU test was skipped: needs 2 GPUs, this machine has 1*"])


def test_with_the_switch_a_skipped_gpu_module_fails(project, monkeypatch):
    project.makepyfile(test_gpu_thing="""
        import pytest
        pytest.importorskip("a_library_that_is_not_here_at_all")
        def test_never():
            pass
    """)
    monkeypatch.setenv("KVCORE_REQUIRE_GPU", "1")
    result = project.runpytest_inprocess("test_gpu_thing.py")
    assert result.ret != pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*the GPU test module test_gpu_thing.py was skipped*"])
    monkeypatch.setenv("KVCORE_REQUIRE_GPU", "0")
    project.runpytest_inprocess("test_gpu_thing.py").assert_outcomes(skipped=1)
