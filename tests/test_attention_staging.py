"""kvcore.attention copies its indices and mask to the device once per step (not per
layer), and runs every operation inside the pool's device scope (cupy launches on the
current device; ``ArrayOps.device_scope`` makes it the pool's)."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import pytest
from kv_numpy import _backend as numpy_backend

import kvcore
from kvcore.attention import PagedLayout, paged_attention


@pytest.fixture
def filled() -> tuple[kvcore.KvCacheManager, list]:
    cfg = kvcore.CacheConfig(num_layers=2, num_kv_heads=2, head_dim=4, dtype="float32",
                             block_size=4, num_blocks=16)
    mgr = kvcore.KvCacheManager(cfg, backend="numpy")
    rng = np.random.default_rng(0)
    handles = []
    for i, n in enumerate([5, 9]):
        h = mgr.allocate(kvcore.AllocationRequest(request_id=f"r{i}", num_tokens=n))
        for layer in range(2):
            k = rng.standard_normal((n, 2, 4)).astype(np.float32)
            h.write(layer, k, -k)
        handles.append(h)
    return mgr, handles


class CountingOps:
    """Wraps the numpy backend's ArrayOps: counts host -> device copies and records
    whether each operation ran inside ``device_scope``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.copies = 0
        self.depth = 0
        self.outside: list[str] = []

    def from_host(self, host: np.ndarray, like: Any) -> Any:
        self.copies += 1
        return self._op("from_host", host, like)

    @contextlib.contextmanager
    def device_scope(self, like: Any):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    def _op(self, name: str, *args: Any) -> Any:
        if self.depth == 0:
            self.outside.append(name)
        return getattr(self.inner, name)(*args)

    def __getattr__(self, name: str) -> Any:
        if name in ("device_key", "array_modules"):
            return getattr(self.inner, name)
        return lambda *args: self._op(name, *args)


@pytest.fixture
def ops(monkeypatch: pytest.MonkeyPatch) -> CountingOps:
    counting = CountingOps(numpy_backend._OPS)
    monkeypatch.setattr(numpy_backend, "_OPS", counting)
    return counting


def test_a_reused_layout_copies_indices_and_mask_once_per_step(filled, ops):
    mgr, handles = filled
    layout = PagedLayout.from_manager(mgr, handles)
    query = np.ones((2, 1, 4, 4), np.float32)
    for layer in range(2):
        paged_attention(query, mgr.layer_pool(layer), layout)
    assert ops.copies == 3  # slots, valid, mask: for both layers together
    paged_attention(np.ones((2, 3, 4, 4), np.float32), mgr.layer_pool(0), layout)
    assert ops.copies == 4  # a new query shape needs its own mask, nothing else


def test_every_array_operation_runs_inside_the_pools_device_scope(filled, ops):
    mgr, handles = filled
    pages = mgr.vllm_block_table(handles)
    paged_attention(np.ones((2, 2, 4, 4), np.float32), mgr.layer_pool(1), pages,
                    query_lens=[1, 2])
    assert ops.outside == [] and ops.copies == 3
