"""Layer groups: sliding windows that give their old blocks back, latent (MLA) layers,
K and V of different widths, cross-attention, and several groups in one sequence kept
in step through allocation, prefix hits, forks, swaps and truncation."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest

from kvcore import AllocationRequest, CacheConfig, KvCacheManager
from kvcore.errors import CapacityError, UnsupportedError
from kvcore.models import GroupKind, LayerGroup

BS = 4


def cfg(*groups: LayerGroup, layers: int, **kw) -> CacheConfig:
    kw.setdefault("num_blocks", 64)
    return CacheConfig(num_layers=layers, num_kv_heads=2, head_dim=4, dtype="float32",
                       block_size=BS, layer_groups=groups, **kw)


def rows(seed: int, n: int, heads: int = 2, dim: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, heads, dim)).astype(np.float32)


def req(rid: str, n: int | None = None, tokens: list[int] | None = None, **kw) -> AllocationRequest:
    return AllocationRequest(request_id=rid, num_tokens=n, prompt_token_ids=tokens, **kw)


# --- configuration ---------------------------------------------------------------------


def test_a_config_without_groups_is_one_full_group_of_every_layer():
    [group] = CacheConfig(num_layers=3, num_kv_heads=2, head_dim=8, num_blocks=4).groups
    assert (group.kind, group.layers, group.num_kv_heads, group.k_dim, group.v_dim) == \
        (GroupKind.full, (0, 1, 2), 2, 8, 8)


@pytest.mark.parametrize("groups, message", [
    ((LayerGroup(layers=(0,)),), "layers \\[1\\] are in no layer group"),
    ((LayerGroup(layers=(0, 1)), LayerGroup(layers=(1,))), "layer 1 is in layer_groups\\[0\\] "
                                                           "and layer_groups\\[1\\]"),
    ((LayerGroup(layers=(0, 5)),), "names layer 5, but the cache has 2 layers"),
])
def test_groups_must_cover_every_layer_exactly_once(groups, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        cfg(*groups, layers=2)


@pytest.mark.parametrize("fields, message", [
    (dict(kind="sliding", layers=(0,)), "a 'sliding' group needs window"),
    (dict(kind="latent", layers=(0,)), "a 'latent' group needs latent_dim"),
    (dict(kind="cross", layers=(0,)), "a 'cross' group needs encoder_tokens"),
    (dict(layers=(0,), window=8), "window applies to 'sliding' groups only"),
    (dict(kind="latent", layers=(0,), latent_dim=8, num_kv_heads=2), "num_kv_heads does not "
                                                                     "apply"),
    (dict(layers=(0, 0)), "name a layer twice"),
    (dict(layers=()), "at least 1 item"),
])
def test_a_group_refuses_fields_that_do_not_fit_its_kind(fields, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        LayerGroup(**fields)


def test_sizes_count_each_groups_own_shape():
    c = cfg(LayerGroup(layers=(0,)), LayerGroup(kind="latent", layers=(1,), latent_dim=6,
                                                num_blocks=10), layers=2)
    # full: 2 heads x (4 + 4) x 4 bytes; latent: 1 x 6 x 4 bytes; per token
    assert c.bytes_per_token == 2 * 8 * 4 + 6 * 4
    assert c.group_bytes_per_block(1) == 6 * 4 * BS
    assert c.total_bytes == 64 * 2 * 8 * 4 * BS + 10 * 6 * 4 * BS


# --- sliding windows --------------------------------------------------------------------


def test_a_long_generation_holds_at_most_the_window_plus_one_block_per_sliding_group():
    window, bs = 512, 16
    c = CacheConfig(num_layers=2, num_kv_heads=1, head_dim=2, dtype="float32", block_size=bs,
                    num_blocks=400, layer_groups=(LayerGroup(kind="sliding", layers=(0,),
                                                             window=window),
                                                  LayerGroup(layers=(1,))))
    mgr = KvCacheManager(c, "numpy")
    h = mgr.allocate(req("long", 8))
    bound = -(-window // bs) + 1
    most = 0
    for _ in range(4096):
        mgr.extend(h, 1)
        sliding = mgr._co.groups[0].table.held(h._seq.row).size
        most = max(most, sliding)
        assert sliding <= bound
    assert most == bound
    stats = h.stats()
    sliding = mgr._co.groups[0].table.held(h._seq.row).size
    full = mgr._co.groups[1].table.held(h._seq.row).size
    assert full == -(-4104 // bs)  # the full-attention layer keeps every token
    assert stats.blocks_allocated == sliding + full
    assert stats.blocks_released == full - sliding  # both groups have the same logical blocks
    assert mgr.stats().window_released_blocks == stats.blocks_released
    mgr.check_invariants()


def test_a_sliding_layer_reads_what_its_window_holds_and_a_full_layer_everything():
    window = 6
    mgr = KvCacheManager(cfg(LayerGroup(kind="sliding", layers=(0,), window=window),
                             LayerGroup(layers=(1,)), layers=2), "numpy")
    h = mgr.allocate(req("a", 0))
    written = {0: [], 1: []}
    for step in range(30):
        slots = mgr.extend_batch([h], 1)
        for layer in (0, 1):
            k = rows(step * 2 + layer, 1)
            mgr.write_slots(layer, slots, k, -k)
            written[layer].append(k)
    full_k = np.concatenate(written[1])
    np.testing.assert_array_equal(h.key_cache(1).native, full_k)
    held = h.key_cache(0).native
    start = h.first_position(0)
    assert start == 30 - held.shape[0] and h.first_position(1) == 0
    assert start % BS == 0 and held.shape[0] >= window  # whole blocks, the window inside
    np.testing.assert_array_equal(held, np.concatenate(written[0])[start:])
    np.testing.assert_array_equal(h.value_cache(0).native, -np.concatenate(written[0])[start:])
    assert h.num_written(0) == 30
    table = h.block_table()  # the primary group is the full one: every block there
    assert all(b >= 0 for b in table.physical_blocks)
    mgr.check_invariants()


def test_positions_a_window_gave_back_cannot_be_written_again():
    mgr = KvCacheManager(cfg(LayerGroup(kind="sliding", layers=(0, 1), window=4), layers=2),
                         "numpy")
    h = mgr.allocate(req("a", 0))
    for step in range(12):
        slots = mgr.extend(h, 1)
        for layer in (0, 1):
            mgr.write_slots(layer, slots, rows(step, 1), rows(step, 1))
    with pytest.raises(CapacityError, match="were given back"):
        mgr.write(h, 0, rows(0, 2), rows(0, 2), start=0)
    with pytest.raises(CapacityError, match="sliding-window layers gave back positions"):
        mgr.truncate(h, 2)
    mgr.truncate(h, 11)  # inside what the window still holds
    mgr.check_invariants()


# --- latent (MLA), split widths, cross-attention --------------------------------------


def test_a_latent_layer_keeps_one_vector_per_token():
    mgr = KvCacheManager(cfg(LayerGroup(layers=(0,)),
                             LayerGroup(kind="latent", layers=(1,), latent_dim=6), layers=2),
                         "numpy")
    h = mgr.allocate(req("a", 5))
    latent = rows(1, 5, heads=1, dim=6)
    mgr.write(h, 1, latent, None)
    np.testing.assert_array_equal(h.key_cache(1).native, latent)
    assert h.value_cache(1) is None
    assert mgr.layer_pool(1).shape == (1, 64, BS, 1, 6)
    with pytest.raises(TypeError, match="pass it as key and value=None"):
        mgr.write(h, 1, latent, latent)
    with pytest.raises(TypeError, match="value is None; this layer keeps K and V"):
        mgr.write(h, 0, rows(0, 5), None)


def test_k_and_v_of_different_widths_live_in_two_pools():
    mgr = KvCacheManager(cfg(LayerGroup(layers=(0,), head_dim=8, v_head_dim=4), layers=1),
                         "numpy")
    h = mgr.allocate(req("a", 3))
    k, v = rows(1, 3, dim=8), rows(2, 3, dim=4)
    mgr.write(h, 0, k, v)
    np.testing.assert_array_equal(h.key_cache(0).native, k)
    np.testing.assert_array_equal(h.value_cache(0).native, v)
    pools = mgr.layer_pools(0)
    assert [p.shape for p in pools] == [(1, 64, BS, 2, 8), (1, 64, BS, 2, 4)]
    with pytest.raises(UnsupportedError, match="use layer_pools"):
        mgr.layer_pool(0)
    slots = mgr.extend(h, 1)
    mgr.write_slots(0, slots, rows(3, 1, dim=8), rows(4, 1, dim=4))
    assert h.key_cache(0).shape == (4, 2, 8) and h.value_cache(0).shape == (4, 2, 4)
    mgr.check_invariants()


def test_cross_attention_holds_the_encoder_tokens_written_once():
    mgr = KvCacheManager(cfg(LayerGroup(layers=(0,)),
                             LayerGroup(kind="cross", layers=(1,), encoder_tokens=10),
                             layers=2), "numpy")
    h = mgr.allocate(req("a", 2, encoder_tokens=7))
    enc_k, enc_v = rows(1, 7), rows(2, 7)
    mgr.write(h, 1, enc_k, enc_v, start=0)
    np.testing.assert_array_equal(h.key_cache(1).native, enc_k)
    slots = mgr.extend(h, 3)  # the decoder grows, the encoder part does not
    mgr.write(h, 0, rows(3, 5), rows(4, 5), start=0)
    with pytest.raises(UnsupportedError, match="cross-attention layer"):
        mgr.write_slots(1, slots, rows(5, 3), rows(5, 3))
    with pytest.raises(CapacityError, match="encoder part"):
        mgr.write(h, 1, rows(6, 2), rows(6, 2), start=6)
    assert h.key_cache(1).shape == (7, 2, 4)
    with pytest.raises(CapacityError, match="exceeds the cross-attention group's"):
        mgr.allocate(req("b", 1, encoder_tokens=11))
    mgr.check_invariants()


# --- several groups in step ------------------------------------------------------------


def hybrid() -> KvCacheManager:
    return KvCacheManager(cfg(LayerGroup(kind="sliding", layers=(0, 2), window=5),
                              LayerGroup(layers=(1, 3)), layers=4, swap_blocks=32), "numpy")


def prefill(mgr: KvCacheManager, h, seed: int) -> None:
    n, start = h.num_tokens(), h.num_cached_tokens()
    for layer in range(4):
        k = rows(seed + layer, n)
        if n > start:
            mgr.write(h, layer, k[start:], -k[start:], start=start)


def test_a_prompt_hit_is_the_shortest_over_the_groups_and_serves_the_same_data():
    mgr = hybrid()
    prompt = list(range(100, 121))  # 21 tokens: 5 full blocks
    a = mgr.allocate(req("a", tokens=prompt))
    prefill(mgr, a, seed=1)
    b = mgr.allocate(req("b", tokens=prompt))
    assert b.num_cached_tokens() == 20  # every full block but the last token's
    for layer in range(4):
        got, want = b.key_cache(layer).native, a.key_cache(layer).native
        lo_b, lo_a = b.first_position(layer), a.first_position(layer)
        assert lo_b >= lo_a and lo_b + got.shape[0] == 20
        np.testing.assert_array_equal(got, want[lo_b - lo_a:20 - lo_a])
    # The sliding group took back only the blocks its window reads from token 20 on.
    held = mgr._co.groups[0].table.held(b._seq.row)
    assert held.size < mgr._co.groups[1].table.held(b._seq.row).size
    mgr.check_invariants()


def test_fork_swap_and_truncate_keep_every_group_in_step():
    mgr = hybrid()
    a = mgr.allocate(req("a", 9))
    prefill(mgr, a, seed=3)
    child = mgr.fork(a, "child")
    slots = mgr.extend_batch([a, child], 1)  # copy-on-write of the shared last blocks
    for layer in range(4):
        mgr.write_slots(layer, slots, rows(40 + layer, 2), rows(50 + layer, 2))
    before = {layer: child.kv_cache(layer) for layer in range(4)}
    mgr.swap_out(child)
    mgr.check_invariants()
    mgr.swap_in(child)
    for layer in range(4):
        for got, want in zip(child.kv_cache(layer), before[layer]):
            np.testing.assert_array_equal(got.native, want.native)
    mgr.truncate(a, 8)
    assert a.num_tokens() == 8 and a.num_written(1) == 8
    mgr.deallocate(a)
    mgr.deallocate(child)
    assert mgr.stats().used_blocks == 0
    mgr.check_invariants()
