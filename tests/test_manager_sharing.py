"""Sharing without corruption: fork (copy-on-write), prefix caching, eviction, gc,
swap, memory pressure, threads, and a constant number of backend calls per layer."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest

import kvcore
from kvcore import AllocationRequest, KvCacheManager, MemoryPressure
from kvcore.errors import CacheError, HandleSwappedError, OutOfBlocksError, UnsupportedError

from .conftest import kv
from .test_manager import assert_same, fill, snapshot
from .test_manager import req as plain_req


def req(rid: str, n: int | None = None, tokens: list[int] | None = None,
        **kw) -> AllocationRequest:
    """Most tests here are about storage-level sharing, so a whole cached prompt may be
    served (``allow_full_hit``); the default rule, which always leaves the last prompt
    token to compute, has tests of its own (tests/test_prefix_rules.py)."""
    if tokens is not None:
        kw.setdefault("allow_full_hit", True)
    return plain_req(rid, n, tokens, **kw)


def prompt(n: int, seed: int = 0) -> list[int]:
    return random.Random(seed).sample(range(1, 50_000), n)


def filled(mgr: KvCacheManager, rid: str, tokens: list[int], **kw):
    """Allocate ``tokens`` and write its prefill, as an engine would."""
    h = mgr.allocate(req(rid, tokens=tokens, **kw))
    fill(mgr, h)
    return h


# --- fork and copy-on-write -----------------------------------------------------------


def test_fork_shares_blocks_and_copies_only_the_block_written(manager, config, rng):
    parent = manager.allocate(req("p", 10))
    k, v = kv(rng, 10, config)
    for layer in range(2):
        manager.write(parent, layer, k, v)
    child = manager.fork(parent, "c")
    assert child.block_table().physical_blocks == parent.block_table().physical_blocks
    assert manager.stats().used_blocks == 3 and manager.stats().copy_on_write_copies == 0
    np.testing.assert_array_equal(child.key_cache(1).native, k)

    manager.extend(child, 1)
    k1, v1 = kv(rng, 1, config)
    for layer in range(2):
        manager.write(child, layer, k1, v1)
    assert manager.stats().copy_on_write_copies == 1  # the shared, partly filled last block
    np.testing.assert_array_equal(child.key_cache(0).native, np.concatenate([k, k1]))
    np.testing.assert_array_equal(parent.key_cache(0).native, k)  # parent untouched
    assert parent.num_tokens() == 10

    manager.extend(parent, 1)
    kp, vp = kv(rng, 1, config)
    manager.write(parent, 0, kp, vp)
    np.testing.assert_array_equal(parent.key_cache(0).native, np.concatenate([k, kp]))
    np.testing.assert_array_equal(child.key_cache(0).native, np.concatenate([k, k1]))
    manager.check_invariants()


def test_overwriting_a_shared_block_copies_it_first(manager, config, rng):
    parent = manager.allocate(req("p", 8))
    k, v = kv(rng, 8, config)
    manager.write(parent, 0, k, v)
    child = manager.fork(parent, "c")
    k2, v2 = kv(rng, 1, config)
    manager.write(child, 0, k2, v2, start=1)
    np.testing.assert_array_equal(parent.key_cache(0).native, k)
    assert child.key_cache(0).native[1].tolist() == k2[0].tolist()
    assert manager.stats().copy_on_write_copies == 1
    manager.check_invariants()


def test_fork_refuses_invalid_parents_and_taken_ids(manager):
    a = manager.allocate(req("a", 4))
    manager.allocate(req("b", 4))
    before = snapshot(manager)
    with pytest.raises(kvcore.errors.DuplicateRequestError, match="'b'"):
        manager.fork(a, "b")
    with pytest.raises(ValueError, match="non-empty str"):
        manager.fork(a, "")
    assert_same(before, snapshot(manager))
    manager.deallocate(a)
    with pytest.raises(kvcore.errors.InvalidHandleError):
        manager.fork(a, "z")


def test_blocks_are_not_freed_while_a_fork_holds_them(manager, config, rng):
    parent = manager.allocate(req("p", 8))
    k, v = kv(rng, 8, config)
    manager.write(parent, 0, k, v)
    child = manager.fork(parent, "c")
    manager.deallocate(parent)
    assert manager.stats().used_blocks == 2
    filler = manager.allocate(req("f", 4 * 30))  # takes every free block
    np.testing.assert_array_equal(child.key_cache(0).native, k)
    manager.deallocate(filler)
    manager.deallocate(child)
    assert manager.stats().used_blocks == 0
    manager.check_invariants()


def test_fork_copy_cost_is_one_block_per_child_whatever_the_length(config, rng):
    cfg = config.model_copy(update={"num_blocks": 512})
    mgr = KvCacheManager(cfg, backend="numpy")
    parent = mgr.allocate(req("p", 1001))
    mgr.write(parent, 0, *kv(rng, 1001, cfg))
    for i in range(8):
        child = mgr.fork(parent, f"c{i}")
        mgr.extend(child, 1)
        mgr.write(child, 0, *kv(rng, 1, cfg))
    assert mgr.stats().copy_on_write_copies == 8
    mgr.check_invariants()


# --- prefix caching ----------------------------------------------------------------------


def test_a_shared_prefix_is_served_from_the_cache_with_its_data(manager, config, rng):
    tokens = prompt(14)
    a = manager.allocate(req("a", tokens=tokens))
    k, v = kv(rng, 14, config)
    for layer in range(2):
        manager.write(a, layer, k, v)
    b = manager.allocate(req("b", tokens=tokens[:12] + [7, 7, 7]))
    assert b.num_cached_tokens() == 12 and b.num_written(1) == 12
    assert b.block_table().physical_blocks[:3] == a.block_table().physical_blocks[:3]
    np.testing.assert_array_equal(b.key_cache(1).native, k[:12])
    s = manager.stats()
    assert (s.prefix_cache_queries, s.prefix_cache_hits) == (6, 3)
    assert s.prefix_cache_hit_rate == pytest.approx(0.5)
    manager.check_invariants()


def test_a_prefix_nobody_has_written_yet_is_not_shared(manager, config, rng):
    tokens = prompt(8)
    a = manager.allocate(req("a", tokens=tokens))
    manager.write(a, 0, *kv(rng, 8, config))  # layer 1 still missing
    b = manager.allocate(req("b", tokens=tokens))
    assert b.num_cached_tokens() == 0 and b.key_cache(0) is None
    assert set(a.block_table().physical_blocks).isdisjoint(b.block_table().physical_blocks)
    manager.write(a, 1, *kv(rng, 8, config))
    assert manager.allocate(req("c", tokens=tokens)).num_cached_tokens() == 8
    manager.check_invariants()


def test_the_prefix_chain_breaks_at_the_first_different_block(manager):
    tokens = prompt(12)
    filled(manager, "a", tokens)
    changed = list(tokens)
    changed[5] += 1  # block 1 differs, so block 2 must not hit even though it is equal
    b = manager.allocate(req("b", tokens=changed))
    assert b.num_cached_tokens() == 4


def test_extra_key_keeps_caches_of_different_models_apart(manager):
    tokens = prompt(8)
    filled(manager, "a", tokens, extra_key="lora-1")
    assert manager.allocate(req("b", tokens=tokens, extra_key="lora-2")).num_cached_tokens() == 0
    assert manager.allocate(req("c", tokens=tokens, extra_key="lora-1")).num_cached_tokens() == 8


def test_a_hash_collision_never_returns_someone_elses_blocks(manager, monkeypatch):
    from kvcore._chain_hash import ChainHasher
    monkeypatch.setattr(ChainHasher, "keys",  # every block of every prompt collides
                        lambda self, blocks, parent: np.full(len(blocks), 42, np.uint64))
    filled(manager, "a", prompt(8, seed=1))
    b = manager.allocate(req("b", tokens=prompt(8, seed=2)))
    assert b.num_cached_tokens() == 0
    assert manager.allocate(req("c", tokens=prompt(8, seed=1))).num_cached_tokens() == 4


def test_prefix_caching_can_be_switched_off(config):
    mgr = KvCacheManager(config.model_copy(update={"enable_prefix_caching": False}), "numpy")
    tokens = prompt(8)
    filled(mgr, "a", tokens)
    assert mgr.allocate(req("b", tokens=tokens)).num_cached_tokens() == 0
    assert mgr.stats().prefix_cache_queries == 0


def test_blocks_filled_by_decoding_join_the_prefix_cache(manager):
    tokens = prompt(6)
    a = manager.allocate(req("a", tokens=tokens))
    generated = [11, 12, 13]
    manager.extend(a, 3, token_ids=generated)  # 9 tokens: block 1 is now full
    fill(manager, a)
    b = manager.allocate(req("b", tokens=tokens + generated))
    assert b.num_cached_tokens() == 8


def test_decoding_without_token_ids_stops_caching_that_sequence(manager):
    tokens = prompt(6)
    a = manager.allocate(req("a", tokens=tokens))
    manager.extend(a, 3)
    fill(manager, a)
    assert manager.allocate(req("b", tokens=tokens + [1, 2, 3])).num_cached_tokens() == 4


def test_a_full_prompt_hit_still_leaves_the_cache_consistent(manager, config, rng):
    tokens = prompt(8)
    a = manager.allocate(req("a", tokens=tokens))
    k, v = kv(rng, 8, config)
    for layer in range(config.num_layers):
        manager.write(a, layer, k, v)
    b = manager.allocate(req("b", tokens=tokens))
    assert b.num_cached_tokens() == 8
    # Recomputing the last prompt token (for its logits) writes into a shared block:
    manager.write(b, 0, k[7:], v[7:], start=7)
    np.testing.assert_array_equal(a.key_cache(0).native, k)
    manager.check_invariants()


# --- eviction and gc ----------------------------------------------------------------------


def test_freed_prefix_blocks_stay_cached_until_evicted_tail_first(manager):
    tokens = prompt(8)
    a = filled(manager, "a", tokens)
    first, second = a.block_table().physical_blocks
    manager.deallocate(a)
    s = manager.stats()
    assert (s.cached_blocks, s.used_blocks) == (2, 0)
    assert manager.allocate(req("b", tokens=tokens)).num_cached_tokens() == 8
    manager.deallocate("b")
    filler = manager.allocate(req("f", 4 * 31))  # 31 blocks: exactly one cached block goes
    assert second in filler.block_table().physical_blocks  # the tail block went first
    assert first not in filler.block_table().physical_blocks
    assert manager.stats().evictions == 1
    manager.deallocate(filler)
    assert manager.allocate(req("c", tokens=tokens)).num_cached_tokens() == 4
    manager.check_invariants()


def test_least_recently_freed_prefix_is_evicted_first(manager):
    old, new = prompt(4, seed=1), prompt(4, seed=2)
    filled(manager, "old", old)
    filled(manager, "new", new)
    manager.deallocate("old")
    manager.deallocate("new")
    manager.allocate(req("f", 4 * 31))  # one eviction
    manager.deallocate("f")
    assert manager.allocate(req("x", tokens=new)).num_cached_tokens() == 4
    assert manager.allocate(req("y", tokens=old)).num_cached_tokens() == 0


def test_gc_drops_the_prefix_cache_of_unreferenced_blocks_only(manager):
    filled(manager, "a", prompt(8, seed=1))
    filled(manager, "b", prompt(8, seed=2))
    manager.deallocate("a")
    stats = manager.gc()
    assert stats.blocks_freed == 2 and stats.bytes_freed == 2 * manager.config.bytes_per_block
    assert manager.stats().cached_blocks == 0 and manager.stats().used_blocks == 2
    assert manager.allocate(req("c", tokens=prompt(8, seed=2))).num_cached_tokens() == 8
    assert manager.allocate(req("d", tokens=prompt(8, seed=1))).num_cached_tokens() == 0
    manager.check_invariants()


# --- memory pressure ------------------------------------------------------------------------


def test_pressure_levels_follow_the_thresholds_and_call_back_on_change(config):
    seen = []
    mgr = KvCacheManager(config, "numpy", on_pressure=lambda level, stats: seen.append(
        (level, stats.used_blocks)))
    assert mgr.pressure() is MemoryPressure.low
    mgr.allocate(req("a", 4 * 23))  # 23/32 = 0.72
    mgr.allocate(req("b", 4 * 5))  # 28/32 = 0.875
    mgr.allocate(req("c", 4 * 3))  # 31/32 = 0.97
    mgr.deallocate("c")
    mgr.deallocate("b")
    mgr.deallocate("a")
    assert seen == [(MemoryPressure.medium, 23), (MemoryPressure.high, 28),
                    (MemoryPressure.critical, 31), (MemoryPressure.high, 28),
                    (MemoryPressure.medium, 23), (MemoryPressure.low, 0)]
    assert mgr.stats().pressure is MemoryPressure.low


# --- swap ---------------------------------------------------------------------------------------


def test_swap_out_and_in_round_trips_bit_identical(manager, config, rng):
    h = manager.allocate(req("a", 10))
    truth = [kv(rng, 10, config) for _ in range(2)]
    for layer, (k, v) in enumerate(truth):
        manager.write(h, layer, k, v)
    manager.swap_out(h)
    assert h.is_swapped() and h.is_valid()
    s = manager.stats()
    assert (s.used_blocks, s.swapped_caches, s.swap_free_blocks) == (0, 1, 13)
    with pytest.raises(HandleSwappedError, match="call swap_in first"):
        h.key_cache(0)
    manager.check_invariants()
    manager.allocate(req("other", 4 * 20))  # the main pool moves on meanwhile
    manager.swap_in(h)
    assert not h.is_swapped()
    for layer, (k, v) in enumerate(truth):
        got_k, got_v = h.kv_cache(layer)
        assert got_k.native.tobytes() == k.tobytes() and got_v.native.tobytes() == v.tobytes()
    manager.extend(h, 1)
    manager.write(h, 0, *kv(rng, 1, config))
    manager.check_invariants()


def test_swapping_out_a_forked_sequence_keeps_the_other_intact(manager, config, rng):
    a = manager.allocate(req("a", 8))
    k, v = kv(rng, 8, config)
    manager.write(a, 0, k, v)
    b = manager.fork(a, "b")
    manager.swap_out(b)
    np.testing.assert_array_equal(a.key_cache(0).native, k)
    manager.swap_in(b)
    np.testing.assert_array_equal(b.key_cache(0).native, k)
    manager.check_invariants()


def test_swap_refusals_change_nothing(manager, config):
    a = manager.allocate(req("a", 4 * 17))  # more than the 16-block swap pool
    before = snapshot(manager)
    with pytest.raises(OutOfBlocksError, match="needs 17 swap blocks, 16 are free"):
        manager.swap_out(a)
    with pytest.raises(CacheError, match="'a' is not swapped out"):
        manager.swap_in(a)
    assert_same(before, snapshot(manager))
    no_swap = KvCacheManager(config.model_copy(update={"swap_blocks": 0}), "numpy")
    with pytest.raises(UnsupportedError, match="no swap pool"):
        no_swap.swap_out(no_swap.allocate(req("a", 1)))


def test_swap_in_without_room_is_refused_and_keeps_the_swapped_data(manager, config, rng):
    a = manager.allocate(req("a", 8))
    k, v = kv(rng, 8, config)
    manager.write(a, 0, k, v)
    manager.swap_out(a)
    manager.allocate(req("hog", 4 * 31))
    with pytest.raises(OutOfBlocksError):
        manager.swap_in(a)
    assert a.is_swapped()
    manager.deallocate("hog")
    manager.swap_in(a)
    np.testing.assert_array_equal(a.key_cache(0).native, k)


def test_deallocating_a_swapped_sequence_frees_its_swap_blocks(manager):
    a = manager.allocate(req("a", 8))
    manager.swap_out(a)
    manager.deallocate(a)
    assert manager.stats().swap_free_blocks == 16
    manager.check_invariants()


# --- threads ---------------------------------------------------------------------------------------


def test_concurrent_operations_keep_every_invariant_and_every_byte(config):
    cfg = config.model_copy(update={"num_blocks": 256})
    mgr = KvCacheManager(cfg, "numpy")
    shared = prompt(8, seed=99)
    errors: list[BaseException] = []

    def worker(wid: int) -> None:
        rnd = np.random.default_rng(wid)
        try:
            for i in range(40):
                rid = f"w{wid}-{i}"
                h = mgr.allocate(AllocationRequest(request_id=rid, prompt_token_ids=shared + [wid, i]))
                n0 = h.num_tokens()
                truth = rnd.standard_normal((n0, 2, 4)).astype(np.float32)
                mgr.write(h, 0, truth, truth, start=0)
                for _ in range(3):
                    mgr.extend(h, 1)
                    t = rnd.standard_normal((1, 2, 4)).astype(np.float32)
                    mgr.write(h, 0, t, t)
                    truth = np.concatenate([truth, t])
                child = mgr.fork(h, rid + "/fork")
                mgr.extend(child, 1)
                t = rnd.standard_normal((1, 2, 4)).astype(np.float32)
                mgr.write(child, 0, t, t)
                got = h.key_cache(0).native
                if not np.array_equal(got, truth):
                    raise AssertionError(f"{rid} read back different data")
                if not np.array_equal(child.key_cache(0).native, np.concatenate([truth, t])):
                    raise AssertionError(f"{rid}/fork read back different data")
                mgr.deallocate(child)
                mgr.deallocate(h)
        except BaseException as exc:  # surface in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    mgr.check_invariants()
    assert mgr.stats().used_blocks == 0 and len(mgr) == 0


# --- backend calls per layer ---------------------------------------------------------------------


def test_a_decode_step_makes_the_same_backend_calls_whatever_the_batch_size(config):
    from kv_numpy._backend import NumpyBackend

    class Counting(NumpyBackend):
        calls: dict[str, int] = {}

        def _count(self, name):
            Counting.calls[name] = Counting.calls.get(name, 0) + 1

        def scatter(self, *a):
            self._count("scatter")
            return super().scatter(*a)

        def index_array(self, *a):
            self._count("index_array")
            return super().index_array(*a)

        def copy_blocks(self, *a):
            self._count("copy_blocks")
            return super().copy_blocks(*a)

    def step_calls(batch: int) -> dict[str, int]:
        cfg = config.model_copy(update={"num_blocks": 4 * batch + 8})
        mgr = KvCacheManager(cfg, Counting())
        handles = [mgr.allocate(req(f"s{i}", 3)) for i in range(batch)]
        for h in handles:
            for layer in range(cfg.num_layers):
                mgr.write(h, layer, np.zeros((3, 2, 4), np.float32), np.zeros((3, 2, 4), np.float32))
        forks = [mgr.fork(h, h.request_id + "'") for h in handles]  # every last block shared
        Counting.calls = {}
        slots = mgr.extend_batch(forks, 1)
        x = np.zeros((batch, 2, 4), np.float32)
        for layer in range(cfg.num_layers):
            mgr.write_slots(layer, slots, x, x)
        return dict(Counting.calls)

    small, large = step_calls(1), step_calls(32)
    assert small == large
    assert small["scatter"] == config.num_layers
    assert small["copy_blocks"] == config.num_layers  # all copy-on-writes in one call per layer


def test_the_prefix_index_stays_consistent_through_many_evictions(config):
    # Enough unique prompts that evicted blocks' stale index entries outnumber the pool
    # several times over and get purged, while shared prompts keep hitting.
    mgr = KvCacheManager(config.model_copy(update={"num_blocks": 16}), "numpy")
    shared = prompt(8, seed=7)
    filled(mgr, "s", shared)
    for i in range(200):
        h = filled(mgr, f"u{i}", prompt(8, seed=1000 + i))
        mgr.deallocate(h)
        mgr.check_invariants()
    assert mgr.allocate(req("again", tokens=shared)).num_cached_tokens() == 8
    assert len(mgr._co.groups[0].prefix) <= 16  # evicted blocks leave no entry behind
    mgr.check_invariants()


# --- truncate -------------------------------------------------------------------------------


def test_truncate_frees_trailing_blocks_and_keeps_the_prefix(manager, config, rng):
    h = manager.allocate(req("a", 10))
    k, v = kv(rng, 10, config)
    manager.write(h, 0, k, v)
    manager.truncate(h, 5)
    assert h.num_tokens() == 5 and h.block_table().num_blocks == 2
    assert manager.stats().used_blocks == 2
    np.testing.assert_array_equal(h.key_cache(0).native, k[:5])
    k2, v2 = kv(rng, 3, config)
    manager.extend(h, 3)
    manager.write(h, 0, k2, v2)
    np.testing.assert_array_equal(h.key_cache(0).native, np.concatenate([k[:5], k2]))
    manager.truncate(h, 0)
    assert h.num_tokens() == 0 and h.key_cache(0) is None and manager.stats().used_blocks == 0
    manager.check_invariants()


def test_truncate_into_a_shared_block_copies_it_before_rewriting(manager, config, rng):
    parent = manager.allocate(req("p", 8))
    k, v = kv(rng, 8, config)
    manager.write(parent, 0, k, v)
    child = manager.fork(parent, "c")
    manager.truncate(child, 6)  # logical block 1 is shared with the parent
    manager.extend(child, 2)
    k2, v2 = kv(rng, 2, config)
    manager.write(child, 0, k2, v2)
    np.testing.assert_array_equal(parent.key_cache(0).native, k)
    np.testing.assert_array_equal(child.key_cache(0).native, np.concatenate([k[:6], k2]))
    manager.check_invariants()


def test_truncate_never_alters_a_cached_prefix_block(manager, config, rng):
    tokens = prompt(8)
    a = manager.allocate(req("a", tokens=tokens))
    k, v = kv(rng, 8, config)
    for layer in range(config.num_layers):
        manager.write(a, layer, k, v)
    manager.truncate(a, 6)
    manager.extend(a, 2)
    for layer in range(config.num_layers):
        manager.write(a, layer, *kv(rng, 2, config))
    b = manager.allocate(req("b", tokens=tokens))
    assert b.num_cached_tokens() == 8
    np.testing.assert_array_equal(b.key_cache(0).native, k)
    manager.check_invariants()


def test_truncate_refusals_change_nothing(manager):
    h = manager.allocate(req("a", 6))
    before = snapshot(manager)
    with pytest.raises(kvcore.errors.CapacityError, match="to 7 tokens: it holds 6"):
        manager.truncate(h, 7)
    with pytest.raises(kvcore.errors.CapacityError, match="-1"):
        manager.truncate(h, -1)
    with pytest.raises(TypeError, match="num_tokens must be an int"):
        manager.truncate(h, 2.0)  # type: ignore[arg-type]
    assert_same(before, snapshot(manager))
    manager.deallocate(h)
    with pytest.raises(kvcore.errors.InvalidHandleError):
        manager.truncate(h, 1)


def test_a_stale_slot_mapping_is_refused_after_truncate(manager, config, rng):
    h = manager.allocate(req("a", 4))
    manager.write(h, 0, *kv(rng, 4, config))
    slots = manager.extend(h, 2)
    manager.truncate(h, 4)
    with pytest.raises(kvcore.errors.StaleSlotMappingError):
        manager.write_slots(0, slots, *kv(rng, 2, config))
