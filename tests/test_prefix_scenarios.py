"""vLLM's prefix-caching scenarios, translated into kvcore's public API.

Source: ``tests/v1/core/test_prefix_caching.py`` of vllm-project/vllm (read at commit
003df2961dd8830c317a61f9745ccd557da9fa06).  Each test below names the vLLM test it
comes from.  vLLM checks its internals (block hashes, the free queue's linked list);
here the same situations are driven through ``allocate`` / ``extend`` / ``write`` /
``deallocate`` with K/V derived from the token prefix (:mod:`tests._prefix_world`),
so a wrong hit reads wrong numbers, and every step reads every live sequence back
and runs ``check_invariants()``.

Translation conventions: vLLM's block 0 is its null block, so vLLM's ``N`` blocks
are kvcore's ``N - 1`` and vLLM's block ``b`` is kvcore's ``b - 1``.  vLLM caches a
block when it is *scheduled*; kvcore serves a block once its K/V are *written* for
every layer (or, with ``join_pending``, to requests admitted in the same step), so
the translations write a prefill before the next request looks it up; the
scheduling-time sharing of vLLM's ``test_prefill`` is translated with
``join_pending`` in ``tests/test_prefix_rules.py``.

Not translated, because they test vLLM internals with no kvcore counterpart:

* hybrid models and several KV cache groups (``test_prefill_hybrid_model*``,
  ``test_cache_blocks_multi_group``, ``test_different_block_size``,
  ``test_hybrid_*``, ``test_*swa*``, ``test_pure_swa_*``, ``test_mamba_*``,
  ``test_eagle_with_sliding_window``, ``test_eagle_hybrid_mamba_*``,
  ``test_eagle_*swa*``, ``test_can_fit_full_sequence_*``,
  ``test_cache_hit_local_and_external*``): kvcore's manager has one group of
  full-attention layers, no sliding window, no Mamba state, no KV connector;
* the hash function (``hash_fn`` parametrisations, ``test_null_parent_block_hash``):
  kvcore's keys are private and only find candidates, every hit is proven by the
  whole chain;
* KV cache events (``test_kv_cache_events_with_lora``, ``test_block_stored_event_*``,
  ``test_block_removed_event_group_idx``, ``test_emit_cached_block_events*``,
  ``test_masked_block_does_not_emit_empty_stored_event``,
  ``test_eagle_kv_event*``): kvcore has no event stream; ``test_kv_cache_events``
  is translated to the counters that tell the same story;
* EAGLE's successor-token hashing (``test_eagle_successor_token_*``,
  ``test_eagle_blocks_are_published_only_after_draft_materialization``,
  ``test_eagle_hash_is_published_when_successor_arrives``,
  ``test_eagle_hashing_supports_resumable_requests``): kvcore has no drafter-aware
  keys; what an EAGLE engine needs from the cache (recompute the last served block
  without disturbing it) is translated from ``test_eagle_identical_prompt_*``;
* ``test_prefill_hybrid_model_mamba_align``, ``test_hybrid_model_mamba_align_*``
  and ``test_hybrid_cache_mamba_align_shared_prefix_detection``: Mamba state.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvcore import AllocationRequest
from kvcore.errors import OutOfBlocksError

from ._prefix_world import World
from .test_manager import assert_same, snapshot

BS = 16  # vLLM's block size in these scenarios


def common3(w: World) -> list[int]:
    """Three full blocks: sixteen 0s, sixteen 1s, sixteen 2s (vLLM's common prefix)."""
    return w.tokens_of(0, 1, 2)


def test_a_written_prompt_is_served_and_freed_blocks_are_reused_empty_first():
    """vLLM ``test_prefill``: hits on the common prefix while its first owner is still
    running and after it finished; the free order (empty blocks first, most recently
    freed first; then never used ones; cached blocks last, tail first)."""
    w = World(num_blocks=10, block_size=BS)
    common = common3(w)
    w.allocate("0", common + [3] * 7)
    assert w.served("0") == 0 and w.blocks("0") == (0, 1, 2, 3)
    w.write("0")
    w.allocate("1", common + [3] * 5)  # hit while "0" still holds the blocks
    assert w.served("1") == 3 * BS and w.blocks("1") == (0, 1, 2, 4)
    s = w.mgr.stats()
    assert (s.free_blocks, s.cached_blocks) == (5, 0)
    w.write("1")
    w.free("0")
    w.free("1")
    s = w.mgr.stats()
    assert (s.free_blocks, s.cached_blocks, s.used_blocks) == (7, 3, 0)

    w.allocate("2", common + [3] * 6)  # hit on free cached blocks; reuses "1"'s tail
    assert w.served("2") == 3 * BS and w.blocks("2") == (0, 1, 2, 4)
    w.write("2")
    w.free("2")

    w.allocate("3", [99] * (BS * 10))  # a miss taking the whole pool: the eviction order
    assert w.blocks("3") == (4, 3, 5, 6, 7, 8, 9, 2, 1, 0)
    assert w.mgr.stats().evictions == 3 and w.mgr.stats().free_blocks == 0
    w.write("3")
    w.free("3")
    w.allocate("4", common + [3])
    assert w.served("4") == 0  # the common prefix was evicted, nothing stale remains


def test_a_request_that_must_compute_its_prompt_still_publishes_it():
    """vLLM ``test_prefill_plp``: a prompt-logprobs request needs every prompt token's
    logits, so it reads nothing from the cache, yet its blocks serve later requests;
    a second such request computes duplicates, which never replace the served copy
    (kvcore keeps one block per key) and go back to the pool as empty blocks."""
    w = World(num_blocks=10, block_size=BS)
    common = common3(w)
    # kvcore's form of "skip reading the prefix cache": no prompt ids at allocation,
    # the prompt arrives through extend (its full blocks are recorded as they fill).
    w.allocate_empty("0")
    w.extend("0", common + [3] * 7)
    assert w.served("0") == 0 and w.blocks("0") == (0, 1, 2, 3)
    w.write("0")
    w.allocate("1", common + [3] * 5)
    assert w.served("1") == 3 * BS and w.blocks("1")[:3] == (0, 1, 2)
    w.write("1")
    w.free("0")
    w.free("1")

    w.allocate_empty("2")
    w.extend("2", common + [3] * 6)
    assert w.served("2") == 0
    assert set(w.blocks("2")).isdisjoint({0, 1, 2})  # the cached blocks were not evicted
    assert w.mgr.stats().cached_blocks == 3
    w.write("2")
    w.allocate("3", common + [5])
    assert w.blocks("3")[:3] == (0, 1, 2)  # the first copy serves, not "2"'s duplicate
    w.free("3")
    w.free("2")
    assert w.mgr.stats().cached_blocks == 3  # the duplicates went back empty
    s = w.mgr.stats()  # only requests allocated with their prompt ids are queries
    assert s.prefix_cache_query_tokens == 53 + 49
    assert s.prefix_cache_hit_tokens == 2 * 3 * BS


def test_blocks_filled_by_decoding_are_cached_and_a_partial_tail_is_not():
    """vLLM ``test_decode``: decoding into the partial last block adds no block; once
    decoding fills it, that block is cached (it serves a later request) while the new
    partial block is not."""
    w = World(num_blocks=10, block_size=BS)
    w.allocate("0", common3(w) + [3] * 7)
    w.write("0")
    for _ in range(4):
        w.decode("0", 8)
    assert len(w.blocks("0")) == 4
    for _ in range(9 + 10):
        w.decode("0", 7)
    assert len(w.blocks("0")) == 5 and w.mgr.get_handle("0").num_tokens() == 78
    seq = w.tokens["0"]
    w.allocate("1", seq + [1])  # 79 tokens: the partial block 4 cannot be a hit
    assert w.served("1") == 4 * BS
    assert w.blocks("1")[:4] == w.blocks("0")[:4]


def test_eviction_takes_empty_blocks_first_then_the_least_recent_tails():
    """vLLM ``test_evict``: freed partial blocks are reused first, cached blocks are
    evicted least recently freed first and a sequence's tail before its prefix; a hit
    takes cached blocks back without evicting anything."""
    w = World(num_blocks=10, block_size=BS)
    last = 5 * BS + 7
    w.allocate("0", list(range(last)))
    w.write("0")
    assert len(w.blocks("0")) == 6
    w.allocate("1", list(range(last, last + 3 * BS)))
    w.write("1")
    assert w.blocks("1") == (6, 7, 8) and w.mgr.stats().free_blocks == 1
    w.free("0")
    s = w.mgr.stats()
    assert (s.free_blocks, s.cached_blocks) == (2, 5)  # "0"'s partial block 5 is empty
    w.free("1")
    assert w.mgr.stats().cached_blocks == 8

    w.allocate("2", list(range(2 * BS + 3)))  # touches the first two blocks
    assert w.served("2") == 2 * BS and w.blocks("2") == (0, 1, 5)
    s = w.mgr.stats()
    assert s.free_blocks + s.cached_blocks == 7 and s.evictions == 0
    w.write("2")
    # The order everything else goes in: the empty block, then "0"'s tail (4, 3, 2),
    # then "1"'s blocks tail first.
    w.allocate("3", list(range(1000, 1000 + 7 * BS)))
    assert w.blocks("3") == (9, 4, 3, 2, 8, 7, 6)
    assert w.mgr.stats().evictions == 6


def test_a_cached_block_reused_for_other_tokens_loses_its_old_prefix():
    """vLLM ``test_hash_block_correct_reuse``: a cached block evicted and refilled by a
    partial block must not be found under its old prefix any more."""
    w = World(num_blocks=2, block_size=BS)
    w.allocate("0", list(range(BS)))
    w.write("0")
    w.free("0")
    w.allocate("filler", [500] * BS)  # takes the empty block, not the cached one
    w.write("filler")
    assert w.mgr.stats().cached_blocks == 1 and w.mgr.stats().evictions == 0
    w.allocate("1", list(range(BS - 1)))
    assert w.served("1") == 0 and w.mgr.stats().evictions == 1
    w.write("1")
    w.free("1")
    w.free("filler")
    assert w.mgr.stats().cached_blocks == 1  # the filler's block; "1"'s is partial
    w.allocate("2", list(range(BS)), allow_full_hit=True)
    assert w.served("2") == 0


def test_a_hit_never_evicts_the_blocks_it_hits():
    """vLLM ``test_computed_blocks_not_evicted``: with a hit on a free cached block,
    the new block comes from the other cached block, not from the hit."""
    w = World(num_blocks=2, block_size=BS)
    w.allocate("0", list(range(BS)))
    w.write("0")
    w.allocate("1", list(range(BS, 2 * BS)))
    w.write("1")
    assert (w.blocks("0"), w.blocks("1")) == ((0,), (1,))
    w.free("0")
    w.free("1")
    w.allocate("2", list(range(2 * BS)))
    assert w.served("2") == BS and w.blocks("2") == (0, 1)
    assert w.mgr.stats().evictions == 1


def test_nothing_is_shared_with_prefix_caching_off():
    """vLLM ``test_basic_prefix_caching_disabled``: no hits, no cached blocks, and an
    allocation the pool cannot hold is refused without changing anything."""
    w = World(num_blocks=4, block_size=4, prefix_caching=False)
    w.allocate("1", list(range(10)))
    assert len(w.blocks("1")) == 3
    w.write("1")
    w.free("1")
    assert w.mgr.stats().cached_blocks == 0
    w.allocate("2", list(range(16)))
    assert w.served("2") == 0 and len(w.blocks("2")) == 4
    w.write("2")
    before = snapshot(w.mgr)
    with pytest.raises(OutOfBlocksError):
        w.mgr.allocate(AllocationRequest(request_id="3", prompt_token_ids=list(range(4))))
    assert_same(before, snapshot(w.mgr))
    s = w.mgr.stats()
    assert (s.prefix_cache_queries, s.prefix_cache_query_tokens) == (0, 0)


def test_blocks_are_cached_as_they_fill_from_where_the_last_recording_stopped():
    """vLLM ``test_cache_blocks``: full blocks are cached from the start, then the
    next ones from where caching stopped (here: a prompt whose ids arrive in two
    parts), and a request written in chunks serves what it has written so far."""
    w = World(num_blocks=8, block_size=4)
    tokens = list(range(14))
    w.allocate("0", tokens[:8])
    w.extend("0", tokens[8:])
    w.write("0", upto=8)  # a chunked prefill: the first two blocks
    w.allocate("1", tokens + [99])
    assert w.served("1") == 8
    w.write("0")
    w.allocate("2", tokens + [99])
    assert w.served("2") == 12


def _image(tag: int, n: int) -> list[int]:
    """``n`` placeholder tokens for one image.  vLLM mixes the image's hash into the
    keys of the blocks it overlaps; an engine on kvcore gets the same by giving the
    placeholders ids derived from the image's hash."""
    return [1_000_000 + tag * 1000 + i for i in range(n)]


def test_images_in_a_prompt_separate_blocks_from_where_they_start():
    """vLLM ``test_mm_prefix_caching``: two requests with the same text and images hit
    every full block, including one filled by decoding; a different image stops the
    hits at the first block it touches, and the text before it is still shared."""
    w = World(num_blocks=16, block_size=BS)
    text = list(range(10))
    common = text + _image(1, 10) + list(range(10, 19)) + _image(2, 19)
    assert len(common) == 3 * BS
    w.allocate("0", common + _image(3, 7) + [100] * 4)
    w.write("0")
    for _ in range(5):
        w.decode("0", 8)  # fills block 3: image 3's end and decoded tokens
    w.allocate("1", w.tokens["0"] + [7])
    assert w.served("1") == 4 * BS
    w.write("1")
    w.allocate("2", common + _image(3, 7) + [200] * 5)
    assert w.served("2") == 3 * BS
    other = text + _image(1, 10) + list(range(10, 19)) + _image(9, 19)
    w.allocate("3", other + [5])
    assert w.served("3") == BS  # block 1 holds the first tokens of image 9
    w.allocate("4", common + [5], extra_key="image-set-b")
    assert w.served("4") == 0  # the coarse form: an extra key salts the whole chain


def test_the_salt_separates_tenants_including_blocks_filled_by_decoding():
    """vLLM ``test_cache_key_salting``: the same salt hits, the same tokens under
    another salt (or none) miss, and a block filled by decoding is cached under its
    request's salt."""
    w = World(num_blocks=16, block_size=BS)
    common = common3(w)
    w.allocate("0", common + [3] * 11, extra_key="salt1")
    w.write("0")
    for _ in range(5):
        w.decode("0", 8)
    w.allocate("1", common + [4] * 11, extra_key="salt1")
    assert w.served("1") == 3 * BS
    w.allocate("2", common + [4] * 11, extra_key="salt2")
    assert w.served("2") == 0
    w.free("1")
    w.free("2")
    w.allocate("3", w.tokens["0"] + [1], extra_key="salt1")
    assert w.served("3") == 4 * BS
    w.allocate("4", w.tokens["0"] + [1])
    assert w.served("4") == 0


def test_a_refused_allocation_leaves_its_hits_untouched():
    """vLLM ``test_prefill_not_enough_free_blocks_with_computed_blocks``: a request whose
    hits include free cached blocks, refused for want of new blocks, changes no
    reference count and evicts nothing; its hits stay cached and serve later."""
    w = World(num_blocks=10, block_size=BS)
    common = common3(w)
    w.allocate("0", common)
    w.write("0")
    w.allocate("1", common * 2)
    assert w.served("1") == 3 * BS
    w.write("1")
    part1 = w.blocks("1")
    w.free("1")
    w.allocate("2", [7] * (2 * BS))
    w.write("2")
    s = w.mgr.stats()
    assert (s.free_blocks + s.cached_blocks, s.cached_blocks) == (5, 3)
    request = AllocationRequest(request_id="3", prompt_token_ids=common * 3)
    before = snapshot(w.mgr)
    assert not w.mgr.can_allocate(request)
    with pytest.raises(OutOfBlocksError, match="needs 3 new blocks.*6 blocks from the "
                                               "prefix cache.*only 2 are free"):
        w.mgr.allocate(request)
    assert_same(before, snapshot(w.mgr))
    assert w.mgr.stats().allocation_failures == 1
    w.step()
    w.free("2")
    w.allocate("3", common * 3)  # room now: the same six blocks serve it
    assert w.served("3") == 6 * BS and w.blocks("3")[:6] == part1


def test_reset_drops_every_key_while_holders_keep_their_data():
    """vLLM ``test_reset_prefix_cache``: vLLM refuses the reset while blocks are in use;
    kvcore resets anyway (weights changed: nothing computed before may be served),
    holders keep reading their data, and once freed their blocks are empty."""
    w = World(num_blocks=10, block_size=BS)
    full = common3(w)
    w.allocate("0", full + [3] * 7)
    w.write("0")
    w.allocate("1", full + [4] * 7)
    assert w.served("1") == 3 * BS
    w.write("1")
    assert w.mgr.reset_prefix_cache() == 3
    w.step()
    w.allocate("2", full + [4] * 7)
    assert w.served("2") == 0
    w.write("2")  # computed with the new weights: cached again
    w.free("0")
    w.free("1")
    w.free("2")
    s = w.mgr.stats()
    assert (s.cached_blocks, s.free_blocks) == (3, 7)  # only "2"'s full blocks
    w.allocate("3", full + [4] * 7)
    assert w.served("3") == 3 * BS
    assert w.mgr.reset_prefix_cache() == 3
    assert w.mgr.stats().cached_blocks == 0


def test_prefix_counters_stay_zero_with_prefix_caching_off():
    """vLLM ``test_prefix_cache_stats_disabled`` (stats off: no prefix-cache stats).
    kvcore always keeps statistics; with prefix caching off its prefix counters stay
    zero through allocate, a would-be hit and a reset."""
    w = World(num_blocks=8, block_size=BS, prefix_caching=False)
    w.allocate("0", list(range(BS)))
    w.write("0")
    w.allocate("1", list(range(BS)) + [1])
    assert w.mgr.reset_prefix_cache() == 0
    s = w.mgr.stats()
    assert (s.prefix_cache_queries, s.prefix_cache_hits, s.prefix_cache_query_tokens,
            s.prefix_cache_hit_tokens, s.prefix_cache_hit_rate) == (0, 0, 0, 0, 0.0)


@pytest.mark.parametrize("blocks_to_cache", [2, 3, 10])
def test_counters_tell_what_was_stored_evicted_and_cleared(blocks_to_cache):
    """vLLM ``test_kv_cache_events`` (BlockStored, BlockRemoved, AllBlocksCleared).
    kvcore has no event stream; the same story in its counters: the blocks a prompt
    stored, the evictions a new prompt caused, the keys a reset dropped."""
    w = World(num_blocks=blocks_to_cache, block_size=BS)
    n = BS * blocks_to_cache
    w.allocate("0", list(range(n)))
    w.write("0")
    w.free("0")
    assert w.mgr.stats().cached_blocks == blocks_to_cache
    w.allocate("1", list(range(n, 2 * n)))  # every cached block goes
    assert w.mgr.stats().evictions == blocks_to_cache
    w.write("1")
    w.free("1")
    assert w.mgr.reset_prefix_cache() == blocks_to_cache
    assert w.mgr.stats().cached_blocks == 0


def test_one_block_per_key_a_duplicate_is_never_served_or_kept():
    """vLLM ``test_block_lookup_cache_single_block_per_key`` /
    ``..._multi_blocks_per_key`` / ``test_maybe_evict_cached_block``.  vLLM's map keeps
    every block cached under a key; kvcore keeps one.  A duplicate (the same prompt
    computed by a request that did not join the first) is never served, leaves no
    entry behind when freed, and evicting the served copy never exposes stale data."""
    w = World(num_blocks=8, block_size=4)
    tokens = w.tokens_of(1, 2) + [3]
    w.allocate("a", tokens)
    w.allocate("b", tokens)  # admitted before "a" wrote anything: computes its own
    assert w.served("b") == 0
    w.write("a")
    w.write("b")
    w.allocate("c", tokens)
    assert w.blocks("c")[:2] == w.blocks("a")[:2]
    w.free("c")
    w.free("a")
    w.free("b")
    assert w.mgr.stats().cached_blocks == 2
    w.allocate("d", list(range(100, 132)))  # the whole pool: both cached blocks go
    assert w.mgr.stats().evictions == 2
    w.write("d")
    w.free("d")
    w.allocate("e", tokens)
    assert w.served("e") == 0


def test_recomputing_the_last_served_block_never_changes_the_cached_copy():
    """vLLM ``test_eagle_identical_prompt_hits_last_safe_block`` and
    ``test_eagle_with_partial_blocks``: an identical prompt is served every full block
    before the one holding its last token; an EAGLE engine that needs the hidden
    states of the last served block recomputes it, and the rewrite goes to a private
    copy while the cached block keeps serving others."""
    w = World(num_blocks=12, block_size=BS)
    aligned = [0] * (3 * BS)
    w.allocate("first", aligned)
    w.write("first")
    w.free("first")
    w.allocate("again", aligned)
    assert w.served("again") == 2 * BS
    unaligned = [0] * (2 * BS + 5)
    w.allocate("partial", unaligned)
    assert w.served("partial") == 2 * BS
    handle = w.mgr.get_handle("again")
    shared = w.blocks("again")[1]
    for layer in range(w.config.num_layers):  # recompute block 1 (positions 16..31)
        k, v = w.expected("again", layer, 2 * BS)
        w.mgr.write(handle, layer, k[BS:], v[BS:], start=BS)
    w.step()
    assert w.blocks("again")[1] != shared and w.blocks("partial")[1] == shared
    assert w.mgr.stats().copy_on_write_copies == 1
    w.write("again")
    w.write("partial")
    w.allocate("third", aligned + [1])
    assert w.served("third") == 3 * BS and w.blocks("third")[1] == shared
    np.testing.assert_array_equal(
        w.mgr.get_handle("third").key_cache(1).native, w.expected("third", 1, 3 * BS)[0])
