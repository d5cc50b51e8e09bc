"""Block-table arithmetic, on plain tables and on the tables of live handles."""

from __future__ import annotations

import json
import pickle

import numpy as np

from kvcore import BlockTable
from kvcore.errors import CacheError, CapacityError

from .._clauses import (
    TABLE_ARITHMETIC,
    TABLE_BLOCKS,
    TABLE_ERRORS,
    TABLE_MUT,
    TABLE_SNAPSHOT,
    check,
    check_equal,
    expect_raises,
)
from ._base import ContractTests, covers
from ._harness import Harness
from .checks import settle

__all__ = ["BlockTableContract"]


def check_arithmetic(table: BlockTable, tokens: int, block_size: int, what: str) -> None:
    """Every derived quantity of ``table`` agrees with ``tokens`` and ``block_size``."""
    blocks = -(-tokens // block_size)
    facts = {"block_size": table.block_size, "sequence_length": table.sequence_length,
                 "num_blocks": table.num_blocks, "capacity": table.capacity,
                 "free_tokens": table.free_tokens, "has_free_space": table.has_free_space,
                 "len": len(table), "physical_blocks": len(table.physical_blocks)}
    want = {"block_size": block_size, "sequence_length": tokens, "num_blocks": blocks,
                "capacity": blocks * block_size, "free_tokens": blocks * block_size - tokens,
                "has_free_space": tokens < blocks * block_size, "len": blocks,
                "physical_blocks": blocks}
    check_equal(facts, want, TABLE_ARITHMETIC, f"{what} ({tokens} tokens)")
    for length in (0, 1, block_size - 1, block_size, block_size + 1, 3 * block_size + 2):
        check_equal(table.blocks_needed_for_length(length), -(-length // block_size),
                    TABLE_ARITHMETIC, f"{what}: blocks_needed_for_length({length})")
    for i, block in enumerate(table.physical_blocks):
        check_equal(table.logical_to_physical(i), block, TABLE_ARITHMETIC,
                    f"{what}: logical_to_physical({i})")
    positions = np.arange(tokens)
    want_slots = (np.asarray(table.physical_blocks, np.int64)[positions // block_size]
                  * block_size + positions % block_size) if tokens else np.zeros(0, np.int64)
    check_equal(table.slots().tolist(), want_slots.tolist(), TABLE_ARITHMETIC,
                f"{what}: slots() (block * block_size + offset)")


class BlockTableContract(ContractTests):
    """Tables of live handles and the :class:`kvcore.BlockTable` API."""

    @covers(TABLE_ARITHMETIC)
    def test_handle_tables_hold_ceil_tokens_over_block_size(
            self, kvcore_default_harness: Harness) -> None:
        h = kvcore_default_harness
        mgr = h.manager(num_blocks=64)
        bs = mgr.block_size
        for n in range(3 * bs + 2):
            handle = h.allocate(mgr, f"r{n}", n)
            check_equal(handle.num_tokens(), n, TABLE_ARITHMETIC, "handle.num_tokens()")
            check_arithmetic(handle.block_table(), n, bs, f"block_table() of r{n}")
        settle(mgr)

    @covers(TABLE_ARITHMETIC)
    def test_tables_grow_by_blocks_as_tokens_are_added(self, kvcore_default_harness: Harness) -> None:
        h = kvcore_default_harness
        mgr = h.manager()
        handle = h.allocate(mgr, "grow", 1)
        bs = mgr.block_size
        for step in range(2, 3 * bs + 2):
            mgr.extend(handle, 1)
            check_arithmetic(handle.block_table(), step, bs, "after extend(1)")
        settle(mgr)

    @covers(TABLE_BLOCKS)
    def test_blocks_are_distinct_and_inside_the_pool(self, kvcore_default_harness: Harness) -> None:
        h = kvcore_default_harness
        mgr = h.manager(num_blocks=16)
        handles = [h.allocate(mgr, f"s{i}", n) for i, n in enumerate((5, 1, 8, 9, 3))]
        seen: dict[int, str] = {}
        for handle in handles:
            for block in handle.block_table().physical_blocks:
                check(0 <= block < 16, TABLE_BLOCKS, f"block id of {handle.request_id!r}",
                      seen=block, expected="0 <= id < 16")
                check(block not in seen, TABLE_BLOCKS, f"block {block} is held by both "
                      f"{seen.get(block)!r} and {handle.request_id!r} without a fork",
                      seen=block)
                seen[block] = handle.request_id
        settle(mgr)

    @covers(TABLE_SNAPSHOT)
    def test_block_table_is_a_snapshot(self, kvcore_default_harness: Harness) -> None:
        h = kvcore_default_harness
        mgr = h.manager()
        handle = h.allocate(mgr, "snap", 6)
        before = handle.block_table()
        snap = handle.block_table()
        snap.add_blocks([999])
        snap.extend_sequence(snap.free_tokens)
        check_equal(handle.block_table(), before, TABLE_SNAPSHOT,
                    "the live table after changing a snapshot")
        check_equal(mgr.stats().used_blocks, before.num_blocks, TABLE_SNAPSHOT,
                    "blocks in use after changing a snapshot")
        settle(mgr)

    @covers(TABLE_MUT)
    def test_block_table_mut_grows_through_the_manager(self, kvcore_default_harness: Harness) -> None:
        h = kvcore_default_harness
        mgr = h.manager()
        handle = h.allocate(mgr, "mut", 3)
        live = handle.block_table_mut()
        expect_raises(TABLE_MUT, CacheError, lambda: live.add_blocks([30]),
                      "block_table_mut().add_blocks([30])")
        live.extend_sequence(1)  # within the last block's free space
        check_equal(handle.num_tokens(), 4, TABLE_MUT, "tokens after block_table_mut()."
                    "extend_sequence(1) on 3")
        check_equal(mgr.get_handle("mut").block_table().sequence_length, 4, TABLE_MUT,
                    "the manager's view after growing through block_table_mut()")
        expect_raises(TABLE_MUT, CapacityError, lambda: live.extend_sequence(1),
                      "block_table_mut().extend_sequence past the blocks held")
        check_equal((handle.num_tokens(), mgr.stats().used_blocks), (4, 1), TABLE_MUT,
                    "(tokens, blocks in use) after the refused extend_sequence")
        check_arithmetic(handle.block_table(), 4, mgr.block_size, "after growing")
        settle(mgr)

    @covers(TABLE_ERRORS)
    def test_plain_tables_refuse_bad_input_and_round_trip(self) -> None:
        table = BlockTable(4, [7, 2], 5)
        check_arithmetic(table, 5, 4, "BlockTable(4, [7, 2], 5)")
        expect_raises(TABLE_ERRORS, CapacityError, lambda: table.extend_sequence(4),
                      "extend_sequence past capacity")
        check_equal(table.sequence_length, 5, TABLE_ERRORS, "length after a refused extend")
        expect_raises(TABLE_ERRORS, ValueError, lambda: table.add_blocks([2]),
                      "add_blocks of a block already held")
        expect_raises(TABLE_ERRORS, ValueError, lambda: BlockTable(0), "BlockTable(0)")
        expect_raises(TABLE_ERRORS, ValueError, lambda: table.blocks_needed_for_length(-1),
                      "blocks_needed_for_length(-1)")
        expect_raises(TABLE_ERRORS, TypeError, lambda: table.blocks_needed_for_length("3"),
                      "blocks_needed_for_length('3')")
        expect_raises(TABLE_ERRORS, IndexError, lambda: table.logical_to_physical(2),
                      "logical_to_physical past the end")
        check_equal(BlockTable.from_json(table.to_json()), table, TABLE_ERRORS, "JSON round trip")
        check_equal(json.loads(table.to_json())["physical_blocks"], [7, 2], TABLE_ERRORS,
                    "JSON physical_blocks")
        check_equal(pickle.loads(pickle.dumps(table)), table, TABLE_ERRORS, "pickle round trip")
