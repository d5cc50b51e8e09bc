"""A reused block id never stands for what it held before: the prefix index accepts a
block only when its parent is the block accepted before it *in the same generation*,
which moves on whenever what was recorded of a block is dropped.  Proven here with
keys that depend on a block's own tokens only (so prefixes that differ early collide
later), the weakest key the index could be given."""

from __future__ import annotations

import numpy as np
import pytest

from kvcore import AllocationRequest, CacheConfig, KvCacheManager
from kvcore._chain_hash import ChainHasher
from kvcore.models import LayerGroup

BS = 4


def _own_tokens_only(blocks: np.ndarray) -> np.ndarray:
    return (blocks.astype(np.uint64) * np.arange(1, BS + 1, dtype=np.uint64)).sum(axis=1)


@pytest.fixture
def weak_keys(monkeypatch):
    monkeypatch.setattr(ChainHasher, "keys",
                        lambda self, blocks, parent: _own_tokens_only(blocks))
    monkeypatch.setattr(ChainHasher, "step",
                        lambda self, parents, blocks: _own_tokens_only(blocks))


def kv_of(tokens: list[int], layer: int) -> np.ndarray:
    """K/V that depend on the whole prefix: a wrong hit reads wrong numbers."""
    out = np.zeros((len(tokens), 1, 2), np.float32)
    acc = 0.0
    for i, t in enumerate(tokens):
        acc = acc * 0.5 + t + layer
        out[i] = acc
    return out


def fill(mgr: KvCacheManager, h, tokens: list[int], start: int = 0) -> None:
    if start >= len(tokens):
        return
    for layer in range(2):
        k = kv_of(tokens, layer)
        mgr.write(h, layer, k[start:], -k[start:], start=start)


def test_a_parent_id_reused_under_a_held_child_never_proves_the_child(weak_keys):
    """A sliding window gives its oldest block back while the sequence keeps the next
    one; the given-back block is evicted and its id reused for another prompt's first
    block.  A query of that prompt followed by the kept block's tokens matches the kept
    block by key, tokens and parent id; only the generation tells it was computed after
    other K/V."""
    cfg = CacheConfig(num_layers=2, num_kv_heads=1, head_dim=2, dtype="float32",
                      block_size=BS, num_blocks=5,
                      layer_groups=(LayerGroup(kind="sliding", layers=(0, 1), window=4),))
    mgr = KvCacheManager(cfg, "numpy")
    tokens = list(range(10, 18))                # A, B
    x = mgr.allocate(AllocationRequest(request_id="x", prompt_token_ids=tokens[:4]))
    fill(mgr, x, tokens[:4])
    for i in range(4, 8):                       # B, token by token
        slots = mgr.extend(x, 1, token_ids=[tokens[i]])
        for layer in range(2):
            k = kv_of(tokens[:i + 1], layer)[i:]
            mgr.write_slots(layer, slots, k, -k)
    for i in range(2):                          # past B: A is wholly out of the window
        slots = mgr.extend(x, 1, token_ids=[30 + i])
        for layer in range(2):
            k = kv_of(tokens + [30, 31][:i + 1], layer)[-1:]
            mgr.write_slots(layer, slots, k, -k)
    group = mgr._co.groups[0]
    row = x._seq.row
    assert group.table.released[row] == 1 and group.pool.num_cached_free == 1  # A, cached
    a_id = int(np.flatnonzero(group.prefix.keyed & (group.pool.ref == 0))[0])
    other = [10, 11, 12, 77]                    # A': differs from A in its last token
    w = mgr.allocate(AllocationRequest(request_id="w", num_tokens=8))  # takes the empty
    z = mgr.allocate(AllocationRequest(request_id="z", prompt_token_ids=other))
    assert group.table.held(z._seq.row).tolist() == [a_id]  # A' in A's block id
    fill(mgr, z, other)
    mgr.deallocate(w)
    query = other + tokens[4:8] + [5]           # [A', B, ...]: x's B matches by weak key
    mgr.deallocate(z)
    y = mgr.allocate(AllocationRequest(request_id="y", prompt_token_ids=query))
    assert y.num_cached_tokens() == 4           # A' (z's, freed and cached), never x's B
    fill(mgr, y, query, start=4)
    for layer in range(2):
        got = y.key_cache(layer).native
        np.testing.assert_array_equal(got, kv_of(query, layer)[y.first_position(layer):])
    mgr.check_invariants()


def test_blocks_evicted_tail_first_never_serve_a_foreign_prefix(weak_keys):
    mgr = KvCacheManager(CacheConfig(num_layers=2, num_kv_heads=1, head_dim=2,
                                     dtype="float32", block_size=BS, num_blocks=4), "numpy")
    first = list(range(10, 18))                 # A, B
    x = mgr.allocate(AllocationRequest(request_id="x", prompt_token_ids=first,
                                       allow_full_hit=True))
    fill(mgr, x, first)
    mgr.deallocate(x)                           # A, B cached and free
    other = list(range(50, 62))                 # three blocks: evicts B (the tail) for one
    z = mgr.allocate(AllocationRequest(request_id="z", prompt_token_ids=other))
    fill(mgr, z, other)
    mgr.deallocate(z)
    evil = [10, 11, 12, 13] + first[4:]
    y = mgr.allocate(AllocationRequest(request_id="y", prompt_token_ids=evil,
                                       allow_full_hit=True))
    fill(mgr, y, evil, start=y.num_cached_tokens())
    for layer in range(2):
        np.testing.assert_array_equal(y.key_cache(layer).native, kv_of(evil, layer))
    mgr.check_invariants()
