"""The conformance suite on CUDA: torch's cuda-parametrized cases and the whole suite on
cupy (whose pools are all on cuda), each in its own process as `kvcore conformance`
runs it.  The suite itself exits non-zero when nothing ran (all skipped), so a backend
that silently lost CUDA fails here.  Marked ``gpu``; not run on real hardware yet."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.gpu_support import needs_cupy_gpus, needs_torch_gpus

pytestmark = pytest.mark.gpu


def _conformance(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "kvcore", "conformance", *args, "-q"],
                            capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert " passed" in result.stdout


@needs_torch_gpus(1)
def test_conformance_suite_on_torch_cuda():
    _conformance("torch", "-k", "cuda")


@needs_cupy_gpus(1)
def test_conformance_suite_on_cupy():
    _conformance("cupy")
