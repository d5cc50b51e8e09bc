"""Shared fixtures for kvcore's own tests."""

from __future__ import annotations

import os
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


# --- KVCORE_REQUIRE_GPU=1: a GPU test that skips is a failure ----------------------------------
# On a GPU machine (``make gpu-check``) a skipped GPU test means the GPU path was never
# exercised: no CUDA build of torch, no cupy, a broken driver.  With the switch on,
# every skip of a ``gpu``-marked test, and every skipped ``test_gpu_*`` module, fails
# with the skip's reason, so the run cannot end green without having run them.

REQUIRE_GPU = "KVCORE_REQUIRE_GPU"


def _gpu_required() -> bool:
    return os.environ.get(REQUIRE_GPU, "").strip() == "1"


def _skip_reason(longrepr: object) -> str:
    text = str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return text.removeprefix("Skipped: ")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _gpu_required() and item.get_closest_marker("gpu") is not None:
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
