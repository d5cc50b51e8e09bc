"""bfloat16 on the numpy backend through ml_dtypes: bit-exact through every operation,
and what zero-copy interop it has (DLPack cannot carry ml_dtypes types)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from kv_numpy._backend import bfloat16_from_float32

import kvcore
from kvcore import AllocationRequest, CacheConfig, Device, DType, KvCacheManager
from kvcore.errors import DtypeMismatchError

CPU = Device("cpu")
BF16 = np.dtype(ml_dtypes.bfloat16)
#: Every bfloat16 bit pattern, once.
ALL_BITS = np.arange(2**16, dtype=np.uint32).astype(np.uint16)


@pytest.fixture
def be() -> kvcore.Backend:
    return kvcore.get_backend("numpy")


def test_numpy_declares_bfloat16_and_why_it_has_no_dlpack(be):
    caps = be.capabilities()
    assert DType.bfloat16 in caps.dtypes and not caps.unsupported_dtypes
    assert "DLPack" in caps.no_dlpack_dtypes[DType.bfloat16]


def test_every_bit_pattern_round_trips_through_bits_and_float32(be):
    pool = be.from_bits(ALL_BITS.reshape(-1, 1, 8), DType.bfloat16, CPU)
    assert pool.dtype == BF16 and be.describe(pool)[1] is DType.bfloat16
    assert np.array_equal(pool.view(np.uint16).reshape(-1), ALL_BITS)
    wide = be.to_numpy(pool)  # the exact widening, NaN payloads included
    assert wide.dtype == np.float32
    assert np.array_equal(wide.view(np.uint32) >> np.uint32(16), ALL_BITS.reshape(-1, 1, 8))
    back = be.from_numpy(wide, DType.bfloat16, CPU)
    assert np.array_equal(back.view(np.uint16), pool.view(np.uint16))


def test_narrowing_rounds_like_torch_and_keeps_nan_payloads():
    x = np.random.default_rng(0).standard_normal(4096).astype(np.float32) * 1e3
    ours = bfloat16_from_float32(x).view(np.uint16)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs)
    nan = np.array([0x7FA50000, 0xFF812345, 0x7F800001], np.uint32).view(np.float32)
    assert bfloat16_from_float32(nan).view(np.uint16).tolist() == [0x7FA5, 0xFF81, 0x7FC0]


def test_every_operation_moves_bfloat16_bits_unchanged(be):
    pool = be.allocate_layer(8, 4, 2, 8, DType.bfloat16, CPU)
    rows = [be.from_bits(ALL_BITS[i * 512:(i + 1) * 512].reshape(32, 2, 8), DType.bfloat16,
                         CPU) for i in range(2)]
    slots = np.random.default_rng(1).permutation(32)
    pool = be.scatter(pool, be.index_array(slots, CPU), rows)
    for plane in (0, 1):
        got = be.gather(pool, plane, be.index_array(slots, CPU))
        assert np.array_equal(got.view(np.uint16), rows[plane].view(np.uint16))
    whole = be.gather(pool, 0, be.index_array(np.arange(32), CPU))  # whole-block path
    assert np.array_equal(whole.view(np.uint16), pool[0].reshape(32, 2, 8).view(np.uint16))
    other = be.allocate_layer(8, 4, 2, 8, DType.bfloat16, CPU)
    other = be.transfer_blocks(pool, be.index_array(np.arange(8), CPU), other,
                               be.index_array(np.arange(8)[::-1].copy(), CPU))
    assert np.array_equal(other[:, ::-1].view(np.uint16), pool.view(np.uint16))
    pool = be.copy_blocks(pool, be.index_array(np.array([0]), CPU), be.index_array(np.array([5]), CPU))
    assert np.array_equal(pool[:, 5].view(np.uint16), pool[:, 0].view(np.uint16))


def test_a_bfloat16_cache_takes_ml_dtypes_arrays_and_reads_them_back(be):
    mgr = KvCacheManager(CacheConfig(num_layers=1, num_kv_heads=2, head_dim=8, num_blocks=4,
                                     block_size=4, dtype="bfloat16"), "numpy")
    h = mgr.allocate(AllocationRequest(request_id="a", num_tokens=6))
    k = ALL_BITS[:96].view(BF16).reshape(6, 2, 8)
    v = ALL_BITS[-96:].view(BF16).reshape(6, 2, 8)
    mgr.write(h, 0, k, v)
    key, value = h.kv_cache(0)
    assert key.dtype is DType.bfloat16 and key.native.dtype == BF16
    assert np.array_equal(key.native.view(np.uint16), k.view(np.uint16))
    assert np.array_equal(value.native.view(np.uint16), v.view(np.uint16))
    with pytest.raises(DtypeMismatchError, match="has dtype float32, the cache holds bfloat16"):
        mgr.write(h, 0, k.astype(np.float32), v.astype(np.float32))


def test_dlpack_refuses_bfloat16_and_the_int16_view_shares_memory_both_ways(be):
    mgr = KvCacheManager(CacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, num_blocks=2,
                                     block_size=2, dtype="bfloat16"), "numpy")
    h = mgr.allocate(AllocationRequest(request_id="a", num_tokens=2))
    mgr.write(h, 0, np.ones((2, 1, 4), BF16), np.ones((2, 1, 4), BF16))
    with pytest.raises(BufferError):
        h.key_cache(0).__dlpack__()
    assert be.asarray(h.key_cache(0), CPU) is not None  # its own reads pass through
    pool = mgr.layer_pool(0).native
    shared = torch.from_numpy(pool.view(np.int16)).view(torch.bfloat16)  # numpy -> torch
    pool[0, 0, 0, 0, 0] = 3.0
    assert shared[0, 0, 0, 0, 0].item() == 3.0
    t = torch.full((2, 1, 4), 2.0, dtype=torch.bfloat16)
    with pytest.raises(DtypeMismatchError, match="t.view\\(torch.int16\\).numpy\\(\\)"):
        be.asarray(t, CPU)
    view = t.view(torch.int16).numpy().view(BF16)  # torch -> numpy, the recipe
    t[0, 0, 0] = 5.0
    assert float(view[0, 0, 0]) == 5.0
    mgr.write(h, 0, view, view, start=0)
    assert float(h.key_cache(0).native[0, 0, 0]) == 5.0


def test_torch_imports_numpy_bfloat16_without_a_copy():
    tb = kvcore.get_backend("torch")
    a = np.zeros((2, 1, 4), BF16)
    t = tb.asarray(a, CPU)
    a[1, 0, 2] = 7.0
    assert t.dtype == torch.bfloat16 and t[1, 0, 2].item() == 7.0
