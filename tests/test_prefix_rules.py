"""The prefix-cache rules engines rely on (issue 17): no copy shadowed by one that
was never written, empty blocks reused before cached ones are evicted, requests
admitted together sharing a prefill (``join_pending``) with a stated guarantee, a
reset after new weights, and token counters read the way vLLM's are.

K/V are derived from the token prefix and every step reads every live sequence back
and checks the invariants (:mod:`tests._prefix_world`).  Block size 4 throughout:
``prompt(w, 1, 2, 3)`` is three full blocks and one more token, so the default
last-token rule lets a repeat be served its three full blocks (12 tokens).
"""

from __future__ import annotations

import numpy as np
import pytest

from kvcore import AllocationRequest
from kvcore.errors import ManagerClosedError, OutOfBlocksError, PendingPrefixError

from ._prefix_world import World


def world(**kw) -> World:
    return World(num_blocks=kw.pop("num_blocks", 24), block_size=4, **kw)


def prompt(w: World, *fills: int) -> list[int]:
    """Full blocks of ``fills``, then one token (so the full blocks can all be hits)."""
    return w.tokens_of(*fills) + [99]


# --- 1. copies never written never shadow copies that are ----------------------------


def test_an_aborted_prefill_never_shadows_a_later_written_copy():
    """Issue 17.1: x is allocated and freed before writing anything; y computes the
    same prompt; z is served y's blocks.  x's blocks never count as cached."""
    w = world()
    p = prompt(w, 1, 2, 3)
    w.allocate("x", p)
    assert w.mgr.stats().cached_blocks == 0
    w.free("x")
    s = w.mgr.stats()
    assert (s.cached_blocks, s.used_blocks) == (0, 0)
    w.allocate("y", p)
    assert w.served("y") == 0
    w.write("y")
    w.allocate("z", p)
    assert w.served("z") == 12 and w.blocks("z")[:3] == w.blocks("y")[:3]


def test_a_live_unwritten_copy_gives_way_to_a_written_one():
    """Issue 17.1, with x still holding its blocks (admitted, not computed yet) when y
    finishes: y's blocks take the keys over; once x is freed, only y's count as
    cached."""
    w = world()
    p = prompt(w, 1, 2, 3)
    w.allocate("x", p)
    w.allocate("y", p)
    w.write("y")
    w.allocate("z", p)
    assert w.served("z") == 12 and w.blocks("z")[:3] == w.blocks("y")[:3]
    w.free("z")
    w.free("x")
    w.free("y")
    assert w.mgr.stats().cached_blocks == 3
    w.allocate("again", p)
    assert w.served("again") == 12


def test_a_preempted_chunked_prefill_keeps_its_written_part_only():
    """Issue 17.1: a chunked prefill preempted after its first chunk: the written block
    stays cached, the unwritten tail shadows nothing and is not counted as cached."""
    w = world()
    p = prompt(w, 1, 2, 3)
    w.allocate("x", p)
    w.write("x", upto=4)
    w.free("x")  # preempted
    assert w.mgr.stats().cached_blocks == 1
    w.allocate("y", p)
    assert w.served("y") == 4
    w.write("y")
    w.allocate("z", p)
    assert w.served("z") == 12


def test_requests_sharing_a_first_block_admitted_together_keep_every_chain_reachable():
    """Two prompts sharing their first block (a system prompt), admitted in the same
    step without joining each other: x's copy of the shared block is served, and
    whatever y computes after it must still be reachable through x's block, now and
    after both finished, instead of holding keys nobody can reach."""
    w = world()
    x = prompt(w, 1, 2, 3)
    y = prompt(w, 1, 5, 6)
    w.allocate("x", x)
    w.allocate("y", y)
    w.write("x")
    w.write("y")
    w.allocate("z", y)
    assert w.served("z") >= 4
    w.write("z")
    w.free("z")
    w.free("y")
    w.allocate("again", y)
    assert w.served("again") == 12


def test_a_copy_finishing_first_does_not_strand_a_slower_prefill():
    """x (a long prompt) is admitted but computed after y, which shares x's first block
    and finishes first: y's block takes the shared key, and x's later blocks must stay
    reachable behind it."""
    w = world()
    x = prompt(w, 1, 2, 3)
    w.allocate("x", x)
    w.allocate("y", prompt(w, 1, 7))
    w.write("y")
    w.write("x")
    w.allocate("z", x)
    assert w.served("z") == 12


def test_a_full_prefill_racing_a_chunked_one_does_not_break_the_chain():
    """x's chunked prefill writes its first block while y (same prompt, admitted in the
    same step) computes everything: a later request is served x's first block and,
    once x finishes, the whole prefix."""
    w = world()
    p = prompt(w, 1, 2, 3)
    w.allocate("x", p)
    w.allocate("y", p)
    w.write("x", upto=4)
    w.write("y")
    w.allocate("z", p)
    assert w.served("z") >= 4
    w.write("x")
    w.allocate("z2", p)
    assert w.served("z2") == 12


def test_a_block_whose_parent_was_evicted_never_shadows_a_new_copy():
    """A request served two cached blocks recomputes the second (an EAGLE engine
    wanting its hidden states: the rewrite goes to a private copy) and computes a third
    block after it; the served second block, now unreferenced, is evicted.  The third
    block can no longer be reached, and must not keep the same prompt, computed again
    later, from being served whole."""
    w = world(num_blocks=12)
    w.allocate("first", prompt(w, 1, 2))
    w.write("first")
    w.free("first")
    p = prompt(w, 1, 2, 3)
    w.allocate("again", p)
    assert w.served("again") == 8
    again = w.mgr.get_handle("again")
    for layer in range(w.config.num_layers):
        k, v = w.expected("again", layer, 8)
        w.mgr.write(again, layer, k[4:], v[4:], start=4)
    w.write("again")
    w.allocate("filler", list(range(100, 132)))  # evicts the served second block
    assert w.mgr.stats().evictions == 1
    w.free("filler")
    w.allocate("new", p)
    assert w.served("new") == 4
    w.write("new")
    w.allocate("repeat", p)
    assert w.served("repeat") == 12


def test_an_unreachable_cached_block_giving_its_key_up_becomes_empty_and_forgotten():
    """As above, with the request gone before the prompt is computed again: its
    unreachable block, free and cached, gives its key up and becomes an empty block
    that keeps nothing of its old prefix (its next owner may never record it, and must
    not register it under that prefix with other K/V)."""
    w = world(num_blocks=12)
    w.allocate("first", prompt(w, 1, 2))
    w.write("first")
    w.free("first")
    p = prompt(w, 1, 2, 3)
    w.allocate("again", p)
    again = w.mgr.get_handle("again")
    for layer in range(w.config.num_layers):
        k, v = w.expected("again", layer, 8)
        w.mgr.write(again, layer, k[4:], v[4:], start=4)
    w.write("again")
    w.free("again")
    w.allocate("filler", list(range(100, 140)))  # evicts the served second block only
    assert w.mgr.stats().evictions == 1
    w.free("filler")
    cached = w.mgr.stats().cached_blocks
    w.allocate("new", p)  # check_invariants() runs after this step
    assert w.served("new") == 4
    assert w.mgr.stats().cached_blocks == cached - 2  # first block served; third dropped
    w.write("new")
    w.allocate("repeat", p)
    assert w.served("repeat") == 12


def test_a_block_that_only_shares_the_key_never_takes_a_prefill_over(monkeypatch):
    """Keys that depend on the position only (every block collides with every block
    at its position): a complete block with the holder's key and parent but other
    tokens is no copy of the holder and must not take its key, else the holder's
    later blocks would be served after the wrong tokens."""
    from kvcore._chain_hash import ChainHasher
    monkeypatch.setattr(ChainHasher, "keys", lambda self, blocks, parent: (
        np.uint64(parent) + np.arange(1, blocks.shape[0] + 1, dtype=np.uint64)))
    monkeypatch.setattr(ChainHasher, "step", lambda self, parents, blocks: (
        parents.astype(np.uint64) + np.uint64(1)))
    w = world()
    x = prompt(w, 1, 2, 3)
    w.allocate("x", x)
    w.write("x", upto=4)  # x's first block only
    w.allocate("y", prompt(w, 1, 5))  # served x's first block, its second collides
    assert w.served("y") == 4
    w.write("y")
    w.write("x")
    w.allocate("mixed", prompt(w, 1, 5, 3))  # y's two blocks, then x's third tokens
    assert w.served("mixed") == 4  # x's third block follows x's second, not y's
    w.allocate("again", x)
    assert w.served("again") == 12


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 8, 9, 12])
def test_the_last_token_rule_at_block_boundaries(n):
    """A prompt of ``n`` tokens is served at most ``(n - 1) // 4`` full blocks; with
    ``allow_full_hit`` every full block."""
    w = world()
    cached = w.tokens_of(1, 2, 3)
    w.allocate("cached", cached + [99])
    w.write("cached")
    w.allocate("default", cached[:n])
    w.allocate("storage", cached[:n], allow_full_hit=True)
    assert w.served("default") == max(0, (n - 1) // 4) * 4
    assert w.served("storage") == n // 4 * 4


# --- 2. empty blocks first, cached blocks in LRU order ---------------------------------


def test_empty_blocks_are_reused_before_any_cached_block_is_evicted():
    """Issue 17.2: freed unwritten and partial blocks, and never used ones, are all
    taken before a single cached block is evicted."""
    w = world(num_blocks=12)
    a, b = prompt(w, 1, 2), prompt(w, 3, 4)
    w.allocate("a", a)
    w.write("a")
    w.allocate("b", b)
    w.write("b")
    w.allocate("unwritten", prompt(w, 5, 6))
    w.free("a")
    w.free("unwritten")
    w.free("b")
    s = w.mgr.stats()
    assert (s.cached_blocks, s.free_blocks) == (4, 8)
    w.allocate("big", list(range(200, 232)))  # exactly the 8 empty blocks
    assert w.mgr.stats().evictions == 0 and w.mgr.stats().cached_blocks == 4
    w.free("big")  # unwritten: its blocks go back empty
    w.allocate("a2", a)
    w.allocate("b2", b)
    assert (w.served("a2"), w.served("b2")) == (8, 8)


def _two_cached_prefixes(w: World) -> tuple[list[int], list[int], tuple, tuple]:
    """Prompts a and b written and freed, then a touched by a hit: b is the least
    recently used.  Returns the prompts and their full blocks."""
    a, b = prompt(w, 1, 2), prompt(w, 3, 4)
    for rid, p in (("a", a), ("b", b)):
        w.allocate(rid, p)
        w.write(rid)
    blocks_a, blocks_b = w.blocks("a")[:2], w.blocks("b")[:2]
    w.free("a")
    w.free("b")
    w.allocate("touch", a)
    assert w.served("touch") == 8
    w.free("touch")
    assert w.mgr.stats().cached_blocks == 4
    return a, b, blocks_a, blocks_b


def test_cached_blocks_are_evicted_least_recently_used_first_tail_first():
    """Issue 17.2: cached blocks keep LRU order (a hit makes a prefix the most recent)
    and a prefix's tail goes before its head."""
    w = world(num_blocks=8)
    _, _, (a0, a1), (b0, b1) = _two_cached_prefixes(w)
    w.allocate("big", list(range(300, 332)))  # the whole pool
    assert w.blocks("big")[4:] == (b1, b0, a1, a0)
    assert w.mgr.stats().evictions == 4


def test_one_eviction_takes_the_least_recent_tail_and_its_head_still_serves():
    """Issue 17.2: with room for one block beyond the empty ones, only the least
    recently used prefix loses its last block."""
    w = world(num_blocks=8)
    a, b, _, _ = _two_cached_prefixes(w)
    w.allocate("big", list(range(300, 320)))  # 4 empty blocks, then one eviction
    assert w.mgr.stats().evictions == 1
    w.free("big")
    w.allocate("b_again", b)
    w.allocate("a_again", a)
    assert (w.served("a_again"), w.served("b_again")) == (8, 4)


# --- 3. requests admitted together share a prefill -----------------------------------


def test_requests_admitted_together_share_a_pending_prefix_when_they_join_it():
    """Issue 17.3 (vLLM ``test_prefill``'s hit while the first request is in flight,
    n > 1 sampling): samples admitted with the writer join its prefix with
    ``join_pending``; without it they compute their own."""
    w = world()
    p = prompt(w, 1, 2, 3)
    w.allocate("writer", p)
    w.allocate("alone", p)
    assert w.served("alone") == 0
    for i in range(3):
        w.allocate(f"sample{i}", p, join_pending=True)
        assert w.served(f"sample{i}") == 12
        assert w.blocks(f"sample{i}")[:3] == w.blocks("writer")[:3]
    s = w.mgr.stats()
    assert s.used_blocks == 4 + 4 + 3 * 1
    assert (s.prefix_cache_query_tokens, s.prefix_cache_hit_tokens) == (5 * 13, 3 * 12)


def test_a_joiner_reads_a_layer_only_after_the_writer_wrote_it():
    """Issue 17.3, the guarantee: a joined block is read only once the writer wrote it
    for the layer read; a read before raises ``PendingPrefixError``, never returns
    unwritten data; after the writer's write of that layer the read is exact, while
    the layers the writer has not reached yet still raise."""
    w = world(num_layers=3)
    p = prompt(w, 1, 2, 3)
    w.allocate("writer", p)
    w.allocate("joiner", p, join_pending=True)
    joiner = w.mgr.get_handle("joiner")
    for layer in range(3):  # one batched forward pass, layer by layer
        for later in range(layer, 3):
            with pytest.raises(PendingPrefixError, match=f"layer {later}"):
                joiner.key_cache(later)
        w.write("writer", layers=[layer])
        w.write("joiner", layers=[layer])  # its own tail: position 12
        k, v = w.expected("joiner", layer, 13)
        np.testing.assert_array_equal(joiner.key_cache(layer).native, k)
        np.testing.assert_array_equal(joiner.value_cache(layer).native, v)
    w.allocate("later", p)
    assert w.served("later") == 12  # complete now: served without joining


def test_joining_finds_nothing_pending_to_join_without_a_writer():
    """``join_pending`` changes nothing when the prefix is complete (an ordinary hit)
    or absent (a miss), and it never joins across salts."""
    w = world()
    p = prompt(w, 1, 2, 3)
    w.allocate("first", p, join_pending=True)
    assert w.served("first") == 0
    w.allocate("other_tenant", p, join_pending=True, extra_key="t2")
    assert w.served("other_tenant") == 0
    w.write("first")
    w.allocate("second", p, join_pending=True)
    assert w.served("second") == 12
    assert w.mgr.get_handle("second").key_cache(0) is not None


def test_an_aborted_writer_leaves_joiners_pending_never_wrong():
    """The writer is deallocated before writing: a joiner's reads of the shared
    prefix raise ``PendingPrefixError`` (the promise was broken), never return
    unwritten data; the joiner can compute the prefix itself, and is then served."""
    w = world()
    p = prompt(w, 1, 2, 3)
    w.allocate("writer", p)
    w.allocate("joiner", p, join_pending=True)
    w.free("writer")
    joiner = w.mgr.get_handle("joiner")
    with pytest.raises(PendingPrefixError):
        joiner.key_cache(0)
    for layer in range(2):
        k, v = w.expected("joiner", layer, 13)
        w.mgr.write(joiner, layer, k, v, start=0)
    w.step()
    np.testing.assert_array_equal(joiner.key_cache(1).native, w.expected("joiner", 1, 13)[0])
    w.allocate("later", p)
    assert w.served("later") == 12


def _abandon(w: World, how: str) -> None:
    if how == "deallocate":
        w.free("writer")
    elif how == "truncate":
        w.mgr.truncate("writer", 0)
        w.tokens["writer"] = []
        w.step()
    else:
        w.mgr.swap_out("writer")
        w.step()


@pytest.mark.parametrize("how", ["deallocate", "truncate", "swap_out"])
def test_a_prefill_abandoned_half_way_says_so_and_is_never_joined_again(how):
    """The writer wrote layer 0 of the shared prefix, then left (freed, truncated or
    swapped out): the joiner reads layer 0 exactly; layer 1 raises
    ``PendingPrefixError`` naming the abandoned positions and the way out (nobody
    will write them); a new ``join_pending`` request does not join the orphaned
    blocks; once the joiner writes them itself, everything reads right."""
    w = world(swap_blocks=8)
    p = prompt(w, 1, 2, 3)
    w.allocate("writer", p)
    w.allocate("joiner", p, join_pending=True)
    w.write("writer", layers=[0])
    _abandon(w, how)
    joiner = w.mgr.get_handle("joiner")
    np.testing.assert_array_equal(joiner.key_cache(0).native, w.expected("joiner", 0, 12)[0])
    with pytest.raises(PendingPrefixError, match=r"abandoned .* layer 1 of positions "
                                                 r"\[0, 12\).*start=0"):
        joiner.key_cache(1)
    w.allocate("late", p, join_pending=True)
    assert w.served("late") == 0
    k, v = w.expected("joiner", 1, 13)
    w.mgr.write(joiner, 1, k, v, start=0)
    w.write("joiner")
    w.step()
    np.testing.assert_array_equal(joiner.value_cache(1).native, v)


def test_a_joiner_cannot_be_swapped_out_before_the_prefill_it_joined():
    """Swapping a joiner out would copy blocks still being written: refused with
    ``PendingPrefixError`` and nothing changes; after the writer's prefill it works."""
    w = world(swap_blocks=8)
    p = prompt(w, 1, 2, 3)
    w.allocate("writer", p)
    w.allocate("joiner", p, join_pending=True)
    with pytest.raises(PendingPrefixError, match="swap"):
        w.mgr.swap_out("joiner")
    w.step()
    w.write("writer")
    w.write("joiner")
    w.mgr.swap_out("joiner")
    w.mgr.swap_in("joiner")
    w.step()


# --- 4. reset -----------------------------------------------------------------------


def test_reset_drops_every_key_but_holders_keep_valid_blocks():
    """Issue 17.4: after new weights, nothing computed before is served to a new
    request, in-use blocks stay valid for their holders, free cached blocks become
    empty, and the holders' blocks become empty when freed."""
    w = world()
    p, q = prompt(w, 1, 2, 3), prompt(w, 4, 5)
    w.allocate("held", p)
    w.write("held")
    w.allocate("gone", q)
    w.write("gone")
    w.free("gone")
    assert w.mgr.stats().cached_blocks == 2
    assert w.mgr.reset_prefix_cache() == 5
    s = w.mgr.stats()
    assert (s.cached_blocks, s.used_blocks) == (0, 4)
    w.step()
    w.allocate("new_p", p, join_pending=True)
    w.allocate("new_q", q)
    assert (w.served("new_p"), w.served("new_q")) == (0, 0)
    w.decode("held", 7)
    w.free("held")
    assert w.mgr.stats().cached_blocks == 0
    assert w.mgr.reset_prefix_cache() == 5  # the new requests' blocks (unwritten)
    assert w.mgr.reset_prefix_cache() == 0


def test_blocks_a_holder_fills_after_a_reset_are_never_published():
    """Issue 17.4: a sequence that keeps decoding after the reset fills blocks built on
    K/V computed before it; they must not be served, nor keep a request computed
    with the new weights from publishing the same tokens."""
    w = world()
    p = w.tokens_of(1) + [2, 2, 2]
    w.allocate("held", p)
    w.write("held")
    w.mgr.reset_prefix_cache()
    w.decode("held", 2)  # fills block 1 on top of a pre-reset block 0
    seq = list(w.tokens["held"])
    w.allocate("fresh", seq + [5])
    assert w.served("fresh") == 0
    w.write("fresh")
    w.allocate("after", seq + [6])
    assert w.served("after") == 8


def test_reset_needs_an_open_manager():
    w = world()
    w.mgr.close()
    with pytest.raises(ManagerClosedError, match="reset_prefix_cache"):
        w.mgr.reset_prefix_cache()


# --- 5. statistics in tokens -----------------------------------------------------------


def test_token_counters_follow_vllms_prefix_cache_metrics():
    """Issue 17.5: queries are the prompt tokens of requests allocated with their ids,
    hits the tokens served (the last-token rule included); allocations without ids,
    refused ones and ``can_allocate`` count nothing; block counters agree."""
    w = world(num_blocks=10)
    p = prompt(w, 1, 2, 3)  # 13 tokens, 3 full blocks
    w.allocate("a", p)
    w.write("a")
    w.allocate("b", p)
    w.mgr.allocate(AllocationRequest(request_id="no_ids", num_tokens=8))
    w.mgr.can_allocate(AllocationRequest(request_id="probe", prompt_token_ids=p))
    s = w.mgr.stats()
    assert (s.prefix_cache_query_tokens, s.prefix_cache_hit_tokens) == (26, 12)
    assert (s.prefix_cache_queries, s.prefix_cache_hits) == (6, 3)
    with pytest.raises(OutOfBlocksError):
        w.mgr.allocate(AllocationRequest(request_id="too_big", prompt_token_ids=[7] * 40))
    w.allocate("full", w.tokens_of(1, 2, 3), allow_full_hit=True)
    s = w.mgr.stats()
    assert (s.prefix_cache_query_tokens, s.prefix_cache_hit_tokens) == (38, 24)
    assert (s.prefix_cache_queries, s.prefix_cache_hits) == (9, 6)
    assert s.prefix_cache_hit_rate == pytest.approx(6 / 9)
