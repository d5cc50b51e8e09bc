"""KvCacheManager on numpy: allocate, extend, write, read, deallocate, and every refusal
leaving the cache exactly as it was."""

from __future__ import annotations

import numpy as np
import pytest

import kvcore
from kv_numpy import NumpyBackend

from kvcore import AllocationRequest, DType, KvCacheManager
from kvcore.errors import (CacheError, CapacityError, DeviceMismatchError, DtypeMismatchError,
                           DuplicateRequestError, InvalidHandleError, LayerIndexError,
                           OutOfBlocksError, ShapeMismatchError, StaleSlotMappingError,
                           UnknownRequestError, WriteOrderError)

from .conftest import kv


def req(rid: str, n: int | None = None, tokens: list[int] | None = None, **kw) -> AllocationRequest:
    return AllocationRequest(request_id=rid, num_tokens=n, prompt_token_ids=tokens, **kw)


def snapshot(mgr: KvCacheManager) -> tuple:
    """Everything observable about the cache's state, to prove a refusal changed nothing."""
    stats = mgr.stats().model_dump(exclude={"allocation_failures"})
    tables = {h.request_id: h.block_table() for h in mgr.list_handles()}
    data = {h.request_id: [None if h.kv_cache(layer) is None else
                           [r.native.copy() for r in h.kv_cache(layer)]
                           for layer in range(mgr.config.num_layers)]
            for h in mgr.list_handles() if not h.is_swapped()}
    return stats, tables, data, [g.pool.ref.tolist() for g in mgr._co.groups]


def assert_same(a: tuple, b: tuple) -> None:
    assert a[0] == b[0] and a[1] == b[1] and a[3] == b[3]
    assert a[2].keys() == b[2].keys()
    for rid in a[2]:
        for la, lb in zip(a[2][rid], b[2][rid]):
            assert (la is None) == (lb is None)
            if la is not None:
                assert all(np.array_equal(x, y) for x, y in zip(la, lb))


# --- allocation -------------------------------------------------------------------------


def test_allocate_reserves_whole_blocks_for_the_tokens(manager):
    h = manager.allocate(req("a", 9))
    t = h.block_table()
    assert (t.sequence_length, t.num_blocks, t.block_size) == (9, 3, 4)
    assert h.num_tokens() == 9 and h.num_cached_tokens() == 0
    assert manager.stats().used_blocks == 3
    manager.check_invariants()


def test_handle_reports_the_model_shape_and_device(manager, config):
    h = manager.allocate(req("a", 1))
    assert (h.num_layers(), h.num_heads(), h.head_dim()) == (2, 2, 4)
    assert h.device() == kvcore.Device("cpu") and h.is_valid()
    from kv_numpy import NumpyKvCacheHandle
    assert h.as_any(NumpyKvCacheHandle) is h


def test_duplicate_request_id_is_refused_without_change(manager):
    manager.allocate(req("a", 5))
    before = snapshot(manager)
    with pytest.raises(DuplicateRequestError, match="'a' already has a live cache"):
        manager.allocate(req("a", 1))
    assert_same(before, snapshot(manager))


def test_out_of_blocks_allocates_nothing_and_counts_the_failure(manager):
    manager.allocate(req("a", 100))  # 25 of 32 blocks
    before = snapshot(manager)
    with pytest.raises(OutOfBlocksError, match="needs 8 new blocks.*only 7 are free"):
        manager.allocate(req("b", 29))
    assert_same(before, snapshot(manager))
    assert manager.stats().allocation_failures == 1
    assert "b" not in manager
    manager.check_invariants()


def fill(mgr: KvCacheManager, handle) -> None:
    """Write K/V for every token of every layer (so its full blocks can be shared)."""
    c = mgr.config
    n = handle.num_tokens()
    for layer in range(c.num_layers):
        x = np.full((n, c.num_kv_heads, c.head_dim), layer, np.float32)
        mgr.write(handle, layer, x, x, start=0)


def test_can_allocate_answers_without_side_effects(manager):
    fill(manager, manager.allocate(req("a", 100, list(range(100)))))
    before = manager.stats()
    assert manager.can_allocate(req("b", 28)) and not manager.can_allocate(req("b", 29))
    assert manager.can_allocate(req("c", tokens=list(range(100))))  # all prefix hits
    assert not manager.can_allocate(req("a", 1))
    assert manager.stats() == before


def test_allocate_rejects_anything_but_a_request(manager):
    with pytest.raises(TypeError, match="AllocationRequest"):
        manager.allocate({"request_id": "a"})  # type: ignore[arg-type]


def test_token_ids_outside_int32_are_refused(manager):
    with pytest.raises(ValueError, match=r"prompt_token_ids\[1\] is 4294967296; token ids must be"):
        manager.allocate(req("a", tokens=[1, 2**32]))
    assert len(manager) == 0


# --- extend and write -----------------------------------------------------------------


def test_extend_adds_blocks_only_when_the_last_one_is_full(manager):
    h = manager.allocate(req("a", 3))
    slots = manager.extend(h, 1)
    assert h.num_tokens() == 4 and h.block_table().num_blocks == 1 and len(slots) == 1
    manager.extend(h, 1)
    assert h.block_table().num_blocks == 2
    manager.check_invariants()


@pytest.mark.parametrize("n, exc", [(0, ValueError), (-2, ValueError), (1.0, TypeError),
                                    (True, TypeError)])
def test_extend_refuses_non_positive_or_non_int_counts(manager, n, exc):
    h = manager.allocate(req("a", 3))
    before = snapshot(manager)
    with pytest.raises(exc, match="num_tokens"):
        manager.extend(h, n)
    assert_same(before, snapshot(manager))


def test_extend_out_of_blocks_changes_nothing(manager):
    a = manager.allocate(req("a", 120))
    b = manager.allocate(req("b", 8))
    before = snapshot(manager)
    with pytest.raises(OutOfBlocksError):
        manager.extend_batch([a, b], 5)  # b fits alone, a does not: all or nothing
    assert_same(before, snapshot(manager))
    assert manager.stats().allocation_failures == 1


def test_written_tokens_read_back_in_logical_order_across_scattered_blocks(manager, config, rng):
    first = manager.allocate(req("first", 8))  # blocks 0, 1
    h = manager.allocate(req("a", 6))  # blocks 2, 3
    manager.deallocate(first)  # 0 and 1 are free again, and taken first
    manager.extend(h, 9)  # so physical order differs from logical order: 2, 3, 0, 1
    blocks = h.block_table().physical_blocks
    assert list(blocks) != sorted(blocks)
    for layer in range(config.num_layers):
        k, v = kv(rng, 15, config)
        manager.write(h, layer, k, v, start=0)
        got_k, got_v = h.kv_cache(layer)
        assert got_k.shape == (15, 2, 4) and got_k.dtype is kvcore.DType.float32
        np.testing.assert_array_equal(got_k.native, k)
        np.testing.assert_array_equal(got_v.native, v)


def test_a_layer_with_nothing_written_reads_as_none(manager, config, rng):
    h = manager.allocate(req("a", 4))
    assert h.key_cache(0) is None and h.value_cache(1) is None and h.kv_cache(0) is None
    manager.write(h, 0, *kv(rng, 4, config))
    assert h.key_cache(0) is not None and h.key_cache(1) is None


def test_reads_return_the_written_prefix_between_extend_and_write(manager, config, rng):
    h = manager.allocate(req("a", 4))
    k, v = kv(rng, 4, config)
    manager.write(h, 0, k, v)
    manager.extend(h, 1)
    assert h.num_tokens() == 5 and h.num_written(0) == 4
    np.testing.assert_array_equal(h.key_cache(0).native, k)
    k1, v1 = kv(rng, 1, config)
    h.write(0, k1, v1)
    np.testing.assert_array_equal(h.key_cache(0).native, np.concatenate([k, k1]))


@pytest.mark.parametrize("shape", [(4, 3, 4), (4, 2, 5), (4, 8), (0, 2, 4)])
def test_write_of_the_wrong_shape_names_it_and_changes_nothing(manager, config, shape):
    h = manager.allocate(req("a", 4))
    manager.write(h, 0, *kv(np.random.default_rng(0), 4, config))
    before = snapshot(manager)
    bad = np.zeros(shape, np.float32)
    good = np.zeros((4, 2, 4), np.float32)
    with pytest.raises(ShapeMismatchError, match=r"has shape \[.*expected"):
        manager.write(h, 1, bad, bad if shape[0] else good, start=0)
    assert_same(before, snapshot(manager))


def test_key_and_value_of_different_lengths_are_refused(manager, config):
    h = manager.allocate(req("a", 4))
    with pytest.raises(ShapeMismatchError, match=r"value has shape \[3, 2, 4\], expected \[4, 2, 4\]"):
        manager.write(h, 0, np.zeros((4, 2, 4), np.float32), np.zeros((3, 2, 4), np.float32))


def test_write_never_casts_a_wrong_dtype(manager):
    h = manager.allocate(req("a", 4))
    before = snapshot(manager)
    x = np.zeros((4, 2, 4), np.float16)
    with pytest.raises(DtypeMismatchError, match="key has dtype float16, the cache holds float32"):
        manager.write(h, 0, x, x)
    assert_same(before, snapshot(manager))


def test_write_from_another_device_names_both_devices(manager):
    class CudaArray:  # a DLPack producer that says it lives on cuda:1
        def __dlpack_device__(self):
            return (2, 1)

        def __dlpack__(self, **kwargs):
            raise AssertionError("must not be consumed")

    h = manager.allocate(req("a", 4))
    with pytest.raises(DeviceMismatchError, match="cuda:1.*cpu"):
        manager.write(h, 0, CudaArray(), CudaArray())


def test_write_accepts_any_dlpack_producer_on_the_right_device(manager, config, rng):
    class Producer:
        def __init__(self, a):
            self.a = a

        def __dlpack__(self, **kw):
            return self.a.__dlpack__(**kw)

        def __dlpack_device__(self):
            return self.a.__dlpack_device__()

    h = manager.allocate(req("a", 4))
    k, v = kv(rng, 4, config)
    manager.write(h, 0, Producer(k), Producer(v))
    np.testing.assert_array_equal(h.key_cache(0).native, k)


@pytest.mark.parametrize("layer", [2, -1, 100])
def test_layer_out_of_range_raises_for_writes_and_reads(manager, config, layer):
    h = manager.allocate(req("a", 4))
    x = np.zeros((4, 2, 4), np.float32)
    with pytest.raises(LayerIndexError, match=f"layer {layer} is out of range.*2 layers"):
        manager.write(h, layer, x, x)
    for read in (h.key_cache, h.value_cache, h.kv_cache):
        with pytest.raises(LayerIndexError, match=str(layer)):
            read(layer)


def test_write_past_the_sequence_end_or_leaving_a_gap_is_refused(manager, config, rng):
    h = manager.allocate(req("a", 4))
    with pytest.raises(CapacityError, match="overruns the sequence of 4 tokens"):
        manager.write(h, 0, *kv(rng, 5, config))
    with pytest.raises(WriteOrderError, match="position 2 of layer 0.*positions 0..1 unwritten"):
        manager.write(h, 0, *kv(rng, 2, config), start=2)
    assert h.key_cache(0) is None


def test_overwriting_earlier_positions_is_allowed(manager, config, rng):
    h = manager.allocate(req("a", 6))
    k, v = kv(rng, 6, config)
    manager.write(h, 0, k, v)
    k2, v2 = kv(rng, 2, config)
    manager.write(h, 0, k2, v2, start=1)
    k[1:3], v[1:3] = k2, v2
    np.testing.assert_array_equal(h.key_cache(0).native, k)


# --- batched writes ---------------------------------------------------------------------


def test_write_slots_writes_one_token_for_each_sequence_in_one_call(manager, config, rng):
    handles = [manager.allocate(req(f"s{i}", 3 + i)) for i in range(3)]
    truth = {}
    for h in handles:
        k, v = kv(rng, h.num_tokens(), config)
        manager.write(h, 0, k, v)
        truth[h.request_id] = (k, v)
    slots = manager.extend_batch(handles, 1)
    assert slots.request_ids == ("s0", "s1", "s2") and len(slots) == 3
    k, v = kv(rng, 3, config)
    manager.write_slots(0, slots, k, v)
    for i, h in enumerate(handles):
        want_k = np.concatenate([truth[h.request_id][0], k[i:i + 1]])
        np.testing.assert_array_equal(h.key_cache(0).native, want_k)
    manager.check_invariants()


def test_a_slot_mapping_made_before_a_fork_is_stale(manager, config, rng):
    h = manager.allocate(req("a", 5))
    manager.write(h, 0, *kv(rng, 5, config))
    slots = manager.extend(h, 1)
    manager.fork(h, "b")  # the parent's last block is now shared
    with pytest.raises(StaleSlotMappingError, match=r"request\(s\) \['a'\] is stale"):
        manager.write_slots(0, slots, *kv(rng, 1, config))


def test_write_slots_checks_the_token_count_and_type(manager, config, rng):
    h = manager.allocate(req("a", 4))
    manager.write(h, 0, *kv(rng, 4, config))
    slots = manager.extend(h, 2)
    with pytest.raises(ShapeMismatchError, match=r"expected \[2, 2, 4\]"):
        manager.write_slots(0, slots, *kv(rng, 1, config))
    with pytest.raises(TypeError, match="SlotMapping"):
        manager.write_slots(0, np.array([1, 2]), *kv(rng, 2, config))  # type: ignore[arg-type]


def test_write_slots_refuses_to_leave_a_gap(manager, config, rng):
    h = manager.allocate(req("a", 4))
    slots = manager.extend(h, 1)  # positions 0..3 of layer 1 were never written
    with pytest.raises(WriteOrderError, match="'a': write at position 4 of layer 1"):
        manager.write_slots(1, slots, *kv(rng, 1, config))


# --- deallocation -------------------------------------------------------------------------


def test_deallocated_handles_are_invalid_and_refuse_every_data_access(manager, config, rng):
    h = manager.allocate(req("a", 4))
    clone = h.clone_handle()
    manager.write(h, 0, *kv(rng, 4, config))
    manager.deallocate("a")
    assert not h.is_valid() and not clone.is_valid()
    x = np.zeros((1, 2, 4), np.float32)
    for call in (lambda: h.key_cache(0), lambda: h.value_cache(0), lambda: h.kv_cache(0),
                 h.block_table, h.block_table_mut, h.stats, h.clone_handle,
                 lambda: manager.write(h, 0, x, x), lambda: manager.extend(h, 1),
                 lambda: manager.fork(h, "b"), lambda: clone.key_cache(0),
                 lambda: h.num_written(0)):
        with pytest.raises(InvalidHandleError, match=r"'a' is gone \(it was deallocated\)"):
            call()
    assert manager.stats().used_blocks == 0
    manager.check_invariants()


def test_a_live_table_taken_before_deallocation_refuses_reads_after_it(manager):
    """Its row may hold another request by now: every read of the old live table is
    an ``InvalidHandleError`` naming the request, never another sequence's blocks (a
    ``block_table()`` snapshot keeps what it was)."""
    h = manager.allocate(req("a", 5))
    snapshot_table, live = h.block_table(), h.block_table_mut()
    before = snapshot_table.physical_blocks
    manager.deallocate(h)
    manager.allocate(req("b", 8))  # takes the freed row
    for read in (len, lambda t: t.physical_blocks, lambda t: t.sequence_length,
                 lambda t: t.copy(), lambda t: t.extend_sequence(1)):
        with pytest.raises(InvalidHandleError, match="request 'a' belongs to a deallocated"):
            read(live)
    assert "deallocated request 'a'" in repr(live)
    assert snapshot_table.physical_blocks == before and snapshot_table.sequence_length == 5


def test_double_deallocate_is_a_typed_error(manager):
    h = manager.allocate(req("a", 4))
    manager.deallocate(h)
    with pytest.raises(InvalidHandleError):
        manager.deallocate(h)
    with pytest.raises(UnknownRequestError, match="no live cache has request id 'a'"):
        manager.deallocate("a")


def test_a_stale_handle_does_not_reach_a_new_cache_with_the_same_id(manager):
    old = manager.allocate(req("a", 4))
    manager.deallocate(old)
    new = manager.allocate(req("a", 8))
    with pytest.raises(InvalidHandleError):
        manager.deallocate(old)
    assert new.is_valid() and "a" in manager


def test_handles_of_another_manager_are_refused(manager, config):
    other = KvCacheManager(config, backend="numpy")
    h = other.allocate(req("a", 4))
    with pytest.raises(InvalidHandleError, match="different manager"):
        manager.extend(h, 1)


def test_get_handle_and_list_handles(manager):
    a = manager.allocate(req("a", 4))
    manager.allocate(req("b", 4))
    assert manager.get_handle("a").cache_id() == a.cache_id()
    assert [h.request_id for h in manager.list_handles()] == ["a", "b"]
    with pytest.raises(UnknownRequestError, match="'zzz'"):
        manager.get_handle("zzz")


def test_clone_is_a_second_reference_to_the_same_cache(manager, config, rng):
    h = manager.allocate(req("a", 4))
    c = h.clone_handle()
    assert c is not h and c.cache_id() == h.cache_id()
    k, v = kv(rng, 4, config)
    manager.write(c, 0, k, v)
    np.testing.assert_array_equal(h.key_cache(0).native, k)
    assert manager.stats().used_blocks == 1  # no data was copied


# --- the guarded live block table -------------------------------------------------------------


def test_block_table_is_a_snapshot_and_the_live_table_is_guarded(manager):
    h = manager.allocate(req("a", 3))
    snap = h.block_table()
    snap.add_blocks([31])
    assert h.block_table().num_blocks == 1
    live = h.block_table_mut()
    with pytest.raises(CacheError, match="use KvCacheManager.extend"):
        live.add_blocks([5])
    live.extend_sequence(1)  # fits in the last block: goes through the manager
    assert h.num_tokens() == 4
    with pytest.raises(CapacityError, match="cannot extend by 1 tokens"):
        live.extend_sequence(1)
    assert h.num_tokens() == 4
    manager.check_invariants()


# --- stats and exports ---------------------------------------------------------------------


def test_handle_stats_describe_its_footprint(manager, config):
    h = manager.allocate(req("a", 6))
    s = h.stats()
    assert (s.blocks_allocated, s.tokens_stored) == (2, 6)
    assert s.memory_bytes == 2 * config.bytes_per_block and s.utilization == 0.75


def test_manager_stats_add_up(manager):
    manager.allocate(req("a", 6, list(range(6))))
    s = manager.stats()
    assert (s.total_blocks, s.used_blocks, s.free_blocks, s.active_caches) == (32, 2, 30, 1)
    assert s.memory_bytes == manager.config.total_bytes
    assert kvcore.CacheManagerStats.model_validate_json(s.model_dump_json()) == s


def test_page_tables_in_flashinfer_and_vllm_form(manager):
    a = manager.allocate(req("a", 6))
    b = manager.allocate(req("b", 4))
    c = manager.allocate(req("c", 9))
    fi = manager.flashinfer_page_table([a, b, c])
    ta, tb, tc = (h.block_table().physical_blocks for h in (a, b, c))
    assert fi.indptr.tolist() == [0, 2, 3, 6]
    assert fi.indices.tolist() == [*ta, *tb, *tc]
    assert fi.last_page_len.tolist() == [2, 4, 1] and fi.page_size == 4
    assert fi.indptr.dtype == fi.indices.dtype == fi.last_page_len.dtype == np.int32
    vl = manager.vllm_block_table(["a", "b", "c"], pad_value=-1)
    assert vl.block_tables.tolist() == [[*ta, -1], [*tb, -1, -1], list(tc)]
    assert vl.seq_lens.tolist() == [6, 4, 9]


def test_layer_pool_is_the_live_pool_not_a_copy(manager, config, rng):
    h = manager.allocate(req("a", 4))
    k, v = kv(rng, 4, config)
    manager.write(h, 1, k, v)
    pool = manager.layer_pool(1)
    assert pool.shape == (2, 32, 4, 2, 4)
    block = h.block_table().physical_blocks[0]
    np.testing.assert_array_equal(np.from_dlpack(pool)[0, block], k)
    np.testing.assert_array_equal(pool.native[1, block], v)


class _Fp16Only(NumpyBackend):
    """numpy as a backend without bfloat16 or float8 would declare itself."""

    name = "fp16-only"

    def capabilities(self) -> kvcore.BackendCapabilities:
        return kvcore.BackendCapabilities(
            dtypes=(DType.float16, DType.float32, DType.int8),
            unsupported_dtypes={DType.bfloat16: "this library has no bfloat16"},
            codecs=(DType.int8,),
            unsupported_codecs={DType.float8_e5m2: "this library has no float8"})


def test_manager_refuses_a_dtype_its_backend_cannot_hold():
    cfg = kvcore.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, num_blocks=2,
                             dtype="bfloat16")
    with pytest.raises(kvcore.errors.UnsupportedError,
                       match="'fp16-only' does not support dtype 'bfloat16': this library has "
                             "no bfloat16"):
        KvCacheManager(cfg, backend=_Fp16Only())


@pytest.mark.parametrize("codec, why", [("float8_e5m2", "this library has no float8"),
                                        ("float8_e4m3", "not declared in its capabilities")])
def test_manager_refuses_a_codec_its_backend_does_not_serve(codec, why):
    cfg = kvcore.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, num_blocks=2,
                             dtype=codec)
    with pytest.raises(kvcore.errors.UnsupportedError,
                       match=f"backend 'fp16-only' does not serve the '{codec}' codec: {why}"):
        KvCacheManager(cfg, backend=_Fp16Only())


def test_manager_refuses_a_codec_computing_in_an_undeclared_dtype():
    cfg = kvcore.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, num_blocks=2,
                             dtype="int8", compute_dtype="bfloat16")
    with pytest.raises(kvcore.errors.UnsupportedError, match="'bfloat16'"):
        KvCacheManager(cfg, backend=_Fp16Only())


def test_manager_refuses_a_device_its_backend_cannot_use():
    cfg = kvcore.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, num_blocks=2,
                             device="cuda:0")
    with pytest.raises(kvcore.errors.UnsupportedError, match="'cuda:0'.*supports cpu"):
        KvCacheManager(cfg, backend="numpy")
