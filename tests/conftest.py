"""Shared fixtures for kvcore's own tests."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import numpy as np
import pytest

import kvcore


@pytest.fixture
def config() -> kvcore.CacheConfig:
    """A small float32 cache: 2 layers, 2 heads of 4, 32 blocks of 4 tokens."""
    return kvcore.CacheConfig(num_layers=2, num_kv_heads=2, head_dim=4, dtype="float32",
                              block_size=4, num_blocks=32, swap_blocks=16)


@pytest.fixture
def manager(config: kvcore.CacheConfig) -> kvcore.KvCacheManager:
    return kvcore.KvCacheManager(config, backend="numpy")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def kv(rng: np.random.Generator, n: int, cfg: kvcore.CacheConfig) -> tuple[np.ndarray, np.ndarray]:
    """Random K and V of ``n`` tokens for ``cfg`` (float32)."""
    shape = (n, cfg.num_kv_heads, cfg.head_dim)
    return (rng.standard_normal(shape).astype(np.float32),
            rng.standard_normal(shape).astype(np.float32))


# --- KVCORE_REQUIRE_GPU=N: a GPU test that skips is a failure ----------------------------------
# On a GPU machine (``make gpu-check``) a skipped GPU test means the GPU path was never
# exercised: no CUDA build of torch, no cupy, a broken driver.  With the switch set to
# N >= 1, every skip of a ``gpu``-marked test, and every skipped ``test_gpu_*`` module,
# fails with the skip's reason, so the run cannot end green without having run them.
# One exception: a test needing more GPUs than N skips as usual when its reason says so
# ("needs 2 GPUs, this machine has 1", tests/gpu_support.py).

REQUIRE_GPU = "KVCORE_REQUIRE_GPU"
_NEEDS_GPUS = re.compile(r"^needs (\d+) GPUs, this machine has \d+")


def _gpus_required() -> int:
    text = os.environ.get(REQUIRE_GPU, "").strip()
    return int(text) if text.isdigit() else 0


def _gpu_required() -> bool:
    return _gpus_required() > 0


def _skip_reason(longrepr: object) -> str:
    text = str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return text.removeprefix("Skipped: ")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _gpu_required() and item.get_closest_marker("gpu") is not None:
        needs = _NEEDS_GPUS.match(_skip_reason(report.longrepr))
        if needs is not None and int(needs.group(1)) > _gpus_required():
            return  # more GPUs than required: the skip states a fact about the machine
        report.outcome = "failed"
        report.longrepr = (f"{REQUIRE_GPU}=1 but this GPU test was skipped: "
                           f"{_skip_reason(report.longrepr)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    name = getattr(collector, "path", None)
    if (report.skipped and _gpu_required() and name is not None
            and name.name.startswith("test_gpu_")):
        report.outcome = "failed"
        report.longrepr = (f"{REQUIRE_GPU}=1 but the GPU test module {name.name} was "
                           f"skipped: {_skip_reason(report.longrepr)}")
