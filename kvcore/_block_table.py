"""BlockTable: which physical blocks hold a sequence, in logical order."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .errors import CapacityError

__all__ = ["BlockTable", "NULL_BLOCK"]

#: A logical block a sliding window gave back: the table keeps its place (logical
#: positions stay aligned) but no physical block holds it any more.
NULL_BLOCK = -1


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return int(value)


class BlockTable:
    """Maps a sequence's logical blocks to physical block ids in a pool.

    Logical block ``i`` holds tokens ``[i * block_size, (i + 1) * block_size)`` of the
    sequence and lives in physical block ``physical_blocks[i]``.  ``sequence_length``
    tokens are in use; the rest of the last block is free space.

    A table is plain data: it compares by value, pickles, and round-trips through
    :meth:`to_json` / :meth:`from_json`.
    """

    __slots__ = ("_block_size", "_blocks", "_length")

    def __init__(self, block_size: int, physical_blocks: Iterable[int] = (),
                 sequence_length: int = 0):
        block_size = _check_count("block_size", block_size)
        if block_size == 0:
            raise ValueError("block_size must be >= 1, got 0")
        self._block_size = block_size
        self._blocks: list[int] = []
        self._length = 0
        self.add_blocks(physical_blocks)
        self.extend_sequence(sequence_length)

    # --- the reference trait's fields --------------------------------------------

    @property
    def block_size(self) -> int:
        """Tokens per block."""
        return self._block_size

    @property
    def physical_blocks(self) -> tuple[int, ...]:
        """Physical block ids in logical order (a snapshot)."""
        return tuple(self._blocks)

    @property
    def sequence_length(self) -> int:
        """Tokens in use."""
        return self._length

    def logical_to_physical(self, logical_block: int) -> int:
        """The physical id of logical block ``logical_block``."""
        index = _check_count("logical_block", logical_block)
        if index >= len(self._blocks):
            raise IndexError(f"logical block {logical_block} is out of range for a table "
                             f"of {len(self._blocks)} blocks")
        return self._blocks[index]

    # --- arithmetic ---------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        """Blocks in the table."""
        return len(self._blocks)

    @property
    def capacity(self) -> int:
        """Tokens the table's blocks can hold."""
        return len(self._blocks) * self._block_size

    @property
    def free_tokens(self) -> int:
        """Tokens that fit in the allocated blocks without adding one."""
        return len(self._blocks) * self._block_size - self._length

    @property
    def has_free_space(self) -> bool:
        """Whether one more token fits without adding a block."""
        return self._length < len(self._blocks) * self._block_size

    def blocks_needed_for_length(self, length: int) -> int:
        """Blocks a sequence of ``length`` tokens occupies: ``ceil(length / block_size)``."""
        length = _check_count("length", length)
        return -(-length // self._block_size)

    def additional_blocks_for(self, num_tokens: int) -> int:
        """Blocks to add before ``num_tokens`` more tokens fit."""
        num_tokens = _check_count("num_tokens", num_tokens)
        return max(0, self.blocks_needed_for_length(self._length + num_tokens) - len(self._blocks))

    # --- mutation -----------------------------------------------------------------

    def add_blocks(self, blocks: Iterable[int]) -> None:
        """Append physical blocks to the end of the table (:data:`NULL_BLOCK` marks a
        place whose block was given back)."""
        new = [b if (b == NULL_BLOCK and not isinstance(b, bool) and isinstance(b, int))
               else _check_count("physical block id", b) for b in blocks]
        seen = set(self._blocks)
        for b in new:
            if b in seen and b != NULL_BLOCK:
                raise ValueError(f"physical block {b} is already in this table")
            seen.add(b)
        self._blocks.extend(new)

    def extend_sequence(self, num_tokens: int) -> None:
        """Mark ``num_tokens`` more tokens as used; they must fit in the blocks held."""
        num_tokens = _check_count("num_tokens", num_tokens)
        if num_tokens > self.free_tokens:
            raise CapacityError(
                f"cannot extend by {num_tokens} tokens: the table holds {self._length} of "
                f"{self.capacity} ({len(self._blocks)} blocks of {self._block_size}); "
                f"add {self.additional_blocks_for(num_tokens)} more blocks first")
        self._length += num_tokens

    # --- slots --------------------------------------------------------------------

    def slots(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Flat slot ids (``block * block_size + offset``) of tokens ``[start, stop)``.

        Vectorised: one numpy expression, whatever the length.
        """
        stop = self._length if stop is None else stop
        if not 0 <= start <= stop <= self.capacity:
            raise IndexError(f"token range [{start}, {stop}) is outside the table's "
                             f"capacity of {self.capacity} tokens")
        positions = np.arange(start, stop, dtype=np.int64)
        return _slots_of(self._blocks, self._block_size, positions)

    # --- value semantics ----------------------------------------------------------

    @classmethod
    def snapshot(cls, block_size: int, blocks: list[int], length: int) -> BlockTable:
        """A table of a manager's sequence, taken as it is (already consistent)."""
        new = cls.__new__(cls)
        new._block_size, new._blocks, new._length = block_size, blocks, length
        return new

    def copy(self) -> BlockTable:
        new = BlockTable.__new__(BlockTable)
        new._block_size, new._blocks, new._length = self._block_size, list(self._blocks), self._length
        return new

    def to_dict(self) -> dict[str, Any]:
        return {"block_size": self._block_size, "physical_blocks": list(self._blocks),
                "sequence_length": self._length}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BlockTable:
        return cls(data["block_size"], data["physical_blocks"], data["sequence_length"])

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> BlockTable:
        return cls.from_dict(json.loads(text))

    def __getstate__(self) -> dict[str, Any]:
        return self.to_dict()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._block_size = state["block_size"]
        self._blocks = list(state["physical_blocks"])
        self._length = state["sequence_length"]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockTable):
            return NotImplemented
        return (self._block_size, self._blocks, self._length) == (
            other._block_size, other._blocks, other._length)

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __len__(self) -> int:
        return len(self._blocks)

    def __repr__(self) -> str:
        return (f"BlockTable(block_size={self._block_size}, "
                f"physical_blocks={self._blocks!r}, sequence_length={self._length})")


def _slots_of(blocks: Sequence[int], block_size: int, positions: np.ndarray) -> np.ndarray:
    """Slot ids of token ``positions`` in a table of ``blocks``."""
    table = np.asarray(blocks, dtype=np.int64)
    return table[positions // block_size] * block_size + positions % block_size
