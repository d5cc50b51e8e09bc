"""KvCacheHandle: fifteen methods, thirteen abstract, two provided; as_any downcasts."""

from __future__ import annotations

import numpy as np
import pytest

from kvcore import BlockTable, CacheHandleStats, Device, KvCacheHandle, TensorRef

TRAIT = {"block_table", "block_table_mut", "as_any", "device", "num_layers", "num_heads",
         "head_dim", "key_cache", "value_cache", "clone_handle", "stats", "is_valid",
         "cache_id", "num_tokens", "kv_cache"}


def test_the_interface_has_the_fifteen_methods_of_the_reference_trait():
    methods = {n for n in dir(KvCacheHandle) if not n.startswith("_")}
    assert methods == TRAIT
    assert KvCacheHandle.__abstractmethods__ == TRAIT - {"as_any", "num_tokens", "kv_cache"}


class DenseHandle(KvCacheHandle):
    """A minimal handle over dense arrays, written against the interface only."""

    def __init__(self, keys: list[np.ndarray | None]):
        self._keys = keys
        self._table = BlockTable(4, [0, 1], 6)

    def block_table(self): return self._table.copy()
    def block_table_mut(self): return self._table
    def device(self): return Device("cpu")
    def num_layers(self): return len(self._keys)
    def num_heads(self): return 1
    def head_dim(self): return 2
    def key_cache(self, layer):
        k = self._keys[layer]
        return None if k is None else TensorRef(k, k.shape, "float32", "cpu")
    value_cache = key_cache
    def clone_handle(self): return self
    def stats(self): return CacheHandleStats(memory_bytes=0, blocks_allocated=2, tokens_stored=6, utilization=0.75)
    def is_valid(self): return True
    def cache_id(self): return "dense"


def test_provided_num_tokens_reads_the_block_table():
    assert DenseHandle([None]).num_tokens() == 6


def test_provided_kv_cache_pairs_keys_and_values_or_is_none():
    k = np.ones((6, 1, 2), np.float32)
    h = DenseHandle([k, None])
    key, value = h.kv_cache(0)
    assert key.native is k and value.native is k
    assert h.kv_cache(1) is None


def test_as_any_returns_self_and_downcasts_or_names_the_real_class():
    h = DenseHandle([None])
    assert h.as_any() is h
    assert h.as_any(DenseHandle) is h
    with pytest.raises(TypeError, match="handle is a .*DenseHandle, not a .*TensorRef"):
        h.as_any(TensorRef)
    with pytest.raises(TypeError, match="as_any expects a class"):
        h.as_any("DenseHandle")  # type: ignore[arg-type]


def test_incomplete_subclass_cannot_be_instantiated():
    class Half(KvCacheHandle):
        def device(self): return Device("cpu")
    with pytest.raises(TypeError, match="abstract"):
        Half()  # type: ignore[abstract]
