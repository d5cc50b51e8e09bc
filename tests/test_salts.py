"""Salts (``extra_key``) are reclaimed once nothing refers to them: a server giving
every user its own salt keeps memory bounded by the live salts, and a reused salt id
never lets one salt's blocks serve another."""

from __future__ import annotations

import numpy as np

from kvcore import AllocationRequest, CacheConfig, KvCacheManager

BS = 4
PROMPT = list(range(100, 100 + 3 * BS))


def manager(num_blocks: int = 64) -> KvCacheManager:
    cfg = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, dtype="float32",
                      block_size=BS, num_blocks=num_blocks)
    return KvCacheManager(cfg, "numpy")


def serve(mgr: KvCacheManager, rid: str, salt: str | None, tokens: list[int],
          value: float, keep: bool = False):
    """Allocate, write the prompt's K/V (all ``value``), and free unless ``keep``;
    returns the prompt tokens served from the prefix cache."""
    before = mgr.stats().prefix_cache_hit_tokens
    h = mgr.allocate(AllocationRequest(request_id=rid, prompt_token_ids=tokens,
                                       extra_key=salt))
    cached = mgr.stats().prefix_cache_hit_tokens - before
    kv = np.full((len(tokens), 1, 2), value, np.float32)
    mgr.write(h, 0, kv[cached:], kv[cached:], start=cached)
    if not keep:
        mgr.deallocate(h)
    return cached


def test_a_stream_of_one_off_salts_keeps_the_registry_bounded():
    mgr = manager(num_blocks=16)   # small: old salts' cached blocks get evicted
    for i in range(3000):
        serve(mgr, f"r{i}", f"user-{i}", [i] * (2 * BS), float(i))
    registry = mgr._co.salts
    # Live references: at most the 16 cached blocks' salts, plus None.
    assert len(registry) <= 2 * 17 + 64
    assert registry.roots.size <= 256
    mgr.check_invariants()


def test_a_salt_still_on_a_cached_block_is_not_reclaimed():
    mgr = manager(num_blocks=64)
    serve(mgr, "a0", "tenant-a", PROMPT, 1.0)          # cached, salt "tenant-a"
    for i in range(500):                                # churn: distinct, tokenless
        h = mgr.allocate(AllocationRequest(request_id=f"c{i}", num_tokens=1,
                                           extra_key=f"one-off-{i}"))
        mgr.deallocate(h)
    assert len(mgr._co.salts) < 200
    # The cached blocks still answer their own salt, and no other.
    assert serve(mgr, "b0", "tenant-b", PROMPT, 2.0) == 0
    # Two full blocks (the last prompt token is always computed).
    assert serve(mgr, "a1", "tenant-a", PROMPT, 3.0) == 2 * BS
    mgr.check_invariants()


def test_a_reused_salt_id_never_serves_the_salt_that_held_it_before():
    """Salt ``x`` records blocks, they are evicted, ``x``'s id is freed and given to
    ``y``: ``y`` must miss on ``x``'s prompt (``x``'s blocks are gone), and ``x``
    coming back gets a fresh id."""
    mgr = manager(num_blocks=8)
    serve(mgr, "x0", "x", PROMPT, 1.0)
    # Evict x's blocks with other prompts, and churn salts so ids get reclaimed.
    for i in range(300):
        serve(mgr, f"e{i}", f"evict-{i}", [7000 + i] * (2 * BS), 0.0)
    assert serve(mgr, "y0", "y", PROMPT, 5.0) == 0
    assert serve(mgr, "x1", "x", PROMPT, 6.0) == 0     # x's old blocks are gone
    # Whichever ids x and y hold now, they differ, and each is served its own K/V.
    assert mgr._co.salt("x") != mgr._co.salt("y")
    h = mgr.allocate(AllocationRequest(request_id="x2", prompt_token_ids=PROMPT,
                                       extra_key="x"))
    assert mgr.stats().prefix_cache_hit_tokens - 0 >= 2 * BS
    assert np.all(np.from_dlpack(h.key_cache(0))[:2 * BS] == 6.0)
    mgr.check_invariants()


def test_store_keys_follow_the_salt_after_its_id_is_reused():
    """Cryptographic block keys take the tenant's extra_key by salt id; once ids are
    reclaimed and handed to other strings, each sequence's keys must still be those of
    its own salt (a stale id -> name cache would key one tenant's blocks as another's)."""
    from kvcore.stores import chain_keys
    key = b"k" * 32
    cfg = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, dtype="float32",
                      block_size=BS, num_blocks=16, crypto_block_keys=True, hash_key=key)
    mgr = KvCacheManager(cfg, "numpy")
    for i in range(300):  # one-off salts: ids are freed and reused
        serve(mgr, f"c{i}", f"churn-{i}", [9000 + i] * BS, 0.0)
    prompt = list(range(500, 500 + 2 * BS + 1))
    for salt in ("alice", "bob", None):
        h = mgr.allocate(AllocationRequest(request_id=f"q-{salt}", prompt_token_ids=prompt,
                                           extra_key=salt))
        want = chain_keys(None, np.array(prompt[:2 * BS]).reshape(2, BS), salt, key)
        assert mgr.block_digests(h) == want
        mgr.deallocate(h)
