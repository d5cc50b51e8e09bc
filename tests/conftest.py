"""Shared fixtures for kvcore's own tests."""

from __future__ import annotations

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
