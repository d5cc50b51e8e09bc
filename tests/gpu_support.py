"""What the GPU tests need, and the skip each gives when it is missing.

A GPU test skips with the library's own reason when it cannot run; with
``KVCORE_REQUIRE_GPU=N`` (tests/conftest.py) such a skip fails, unless it says the
test needs more GPUs than the ``N`` required ("needs 2 GPUs, this machine has 1"), so
``make gpu-check`` passes on a one-GPU machine and still runs every single-GPU test.
"""

from __future__ import annotations

import functools

import pytest

__all__ = ["cupy_problem", "gpu_count_reason", "needs_cupy_gpus", "needs_torch_gpus",
           "torch_problem"]


def gpu_count_reason(needed: int, present: int) -> str:
    """The skip reason the conftest lets stand when fewer GPUs are required."""
    return f"needs {needed} GPUs, this machine has {present}"


@functools.cache
def torch_problem() -> str | None:
    """Why torch cannot use CUDA here (torch's words), else ``None``."""
    try:
        from kv_torch._backend import cuda_problem
    except ImportError as exc:
        return f"kv_torch is not importable: {exc}"
    problem = cuda_problem()
    return None if problem is None else f"torch cannot use CUDA here: {problem}"


@functools.cache
def cupy_problem() -> str | None:
    """Why the cupy backend cannot run here (its probe's reason), else ``None``."""
    import kvcore
    try:
        kvcore.get_backend("cupy")
    except kvcore.errors.BackendError as exc:
        return str(exc)
    return None


def needs_torch_gpus(n: int = 1) -> pytest.MarkDecorator:
    problem = torch_problem()
    if problem is None:
        import torch
        count = torch.cuda.device_count()
        if count < n:
            problem = gpu_count_reason(n, count)
    return pytest.mark.skipif(problem is not None, reason=problem or "")


def needs_cupy_gpus(n: int = 1) -> pytest.MarkDecorator:
    problem = cupy_problem()
    if problem is None:
        import cupy
        count = int(cupy.cuda.runtime.getDeviceCount())
        if count < n:
            problem = gpu_count_reason(n, count)
    return pytest.mark.skipif(problem is not None, reason=problem or "")
