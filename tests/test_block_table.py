"""BlockTable arithmetic, refusal without change, and serialisation."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from kvcore import BlockTable
from kvcore.errors import CapacityError


def test_empty_table_has_no_room():
    t = BlockTable(16)
    assert (t.block_size, t.num_blocks, t.sequence_length, t.free_tokens) == (16, 0, 0, 0)
    assert not t.has_free_space
    assert t.physical_blocks == ()


def test_add_blocks_and_extend_track_free_space():
    t = BlockTable(4)
    t.add_blocks([7, 3])
    assert t.capacity == 8 and t.free_tokens == 8 and t.has_free_space
    t.extend_sequence(5)
    assert t.sequence_length == 5 and t.free_tokens == 3
    t.extend_sequence(3)
    assert t.free_tokens == 0 and not t.has_free_space
    assert t.physical_blocks == (7, 3)
    assert t.logical_to_physical(0) == 7 and t.logical_to_physical(1) == 3


@pytest.mark.parametrize("length, blocks", [(0, 0), (1, 1), (4, 1), (5, 2), (8, 2), (9, 3)])
def test_blocks_needed_for_length_is_ceiling_division(length, blocks):
    assert BlockTable(4).blocks_needed_for_length(length) == blocks


def test_additional_blocks_for_counts_only_what_is_missing():
    t = BlockTable(4, [1], 3)
    assert t.additional_blocks_for(1) == 0
    assert t.additional_blocks_for(2) == 1
    assert t.additional_blocks_for(9) == 2  # 12 tokens: 3 blocks
    assert t.additional_blocks_for(10) == 3


def test_extend_past_capacity_refuses_and_changes_nothing():
    t = BlockTable(4, [1, 2], 6)
    before = t.copy()
    with pytest.raises(CapacityError, match="cannot extend by 3 tokens.*holds 6 of 8"):
        t.extend_sequence(3)
    assert t == before


@pytest.mark.parametrize("bad, exc", [(-1, ValueError), (1.5, TypeError), ("2", TypeError),
                                      (True, TypeError)])
def test_extend_rejects_non_counts(bad, exc):
    t = BlockTable(4, [1], 0)
    with pytest.raises(exc, match="num_tokens"):
        t.extend_sequence(bad)
    assert t.sequence_length == 0


def test_add_blocks_refuses_duplicates_without_change():
    t = BlockTable(4, [1, 2])
    with pytest.raises(ValueError, match="physical block 2 is already in this table"):
        t.add_blocks([5, 2])
    assert t.physical_blocks == (1, 2)
    with pytest.raises(ValueError, match="physical block id must be >= 0"):
        t.add_blocks([-2])


def test_null_blocks_keep_the_place_of_blocks_a_window_gave_back():
    from kvcore._block_table import NULL_BLOCK
    t = BlockTable(4, [NULL_BLOCK, NULL_BLOCK, 7], 10)
    assert t.physical_blocks == (-1, -1, 7) and t.logical_to_physical(2) == 7
    assert BlockTable.from_json(t.to_json()) == t


def test_logical_to_physical_out_of_range_names_the_index():
    with pytest.raises(IndexError, match="logical block 2 is out of range for a table of 2"):
        BlockTable(4, [1, 2]).logical_to_physical(2)


def test_block_size_must_be_positive():
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        BlockTable(0)


def test_slots_follow_logical_order_across_blocks():
    t = BlockTable(4, [9, 2], 6)
    np.testing.assert_array_equal(t.slots(), [36, 37, 38, 39, 8, 9])
    np.testing.assert_array_equal(t.slots(3, 5), [39, 8])
    with pytest.raises(IndexError):
        t.slots(0, 9)


def test_round_trips_through_json_dict_and_pickle():
    t = BlockTable(8, [4, 0, 6], 17)
    assert BlockTable.from_json(t.to_json()) == t
    assert BlockTable.from_dict(t.to_dict()) == t
    assert pickle.loads(pickle.dumps(t)) == t


def test_copy_is_independent():
    t = BlockTable(4, [1], 2)
    c = t.copy()
    c.add_blocks([2])
    c.extend_sequence(4)
    assert t == BlockTable(4, [1], 2)


def test_physical_blocks_is_a_snapshot():
    t = BlockTable(4, [1, 2])
    snapshot = t.physical_blocks
    t.add_blocks([3])
    assert snapshot == (1, 2)
