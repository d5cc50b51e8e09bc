"""Where new tokens go (SlotMapping) and page tables for attention kernels."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import itertools
from collections.abc import Sequence

import numpy as np

from .errors import NotCopyableError

if TYPE_CHECKING:
    from ._block_table import BlockTable
    from ._backend import Backend
    from ._device import Device

__all__ = ["SlotMapping", "FlashInferPageTable", "VllmBlockTable"]


@dataclass(frozen=True, eq=False)
class SlotMapping:
    """The pool slots reserved by one ``extend`` or ``extend_batch`` call.

    ``slots[i]`` is the flat slot (``block * block_size + offset``) of the ``i``-th new
    token, sequences in the order given, tokens in logical order: exactly the
    ``slot_mapping`` vLLM's ``reshape_and_cache`` takes.  Pass the mapping to
    :meth:`KvCacheManager.write_slots` once per layer; the backend index it needs is
    built on first use and reused for every layer.  Its arrays are read-only.
    """

    slots: np.ndarray
    #: Per sequence: the manager's row, first and one-past-last new position.
    rows: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    #: Per sequence: the block-layout version the slots were computed against.
    versions: np.ndarray
    request_ids: tuple[str, ...]
    #: The identity of the manager that made it; every other manager refuses it.
    owner: object = field(default=None, repr=False)
    #: Per layer group of the manager: the slots of the same tokens in that group's
    #: pools (``None`` for a cross-attention group).  ``slots`` is the first one's.
    group_slots: tuple[np.ndarray | None, ...] = field(default=(), repr=False)
    _native: dict[Any, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # These arrays decide where write_slots writes and what it checks; edited in
        # place (a buffer an engine reuses) they would aim writes at another request's
        # blocks past every check, so they are read-only.
        arrays = [getattr(self, name) for name in ("slots", "rows", "starts", "ends",
                                                   "versions")]
        for array in [*arrays, *self.group_slots]:
            if isinstance(array, np.ndarray):
                array.flags.writeable = False

    @property
    def num_tokens(self) -> int:
        return int(self.slots.shape[0])

    def __len__(self) -> int:
        return self.num_tokens

    def __reduce__(self) -> Any:
        raise NotCopyableError("a SlotMapping belongs to the manager that made it and is "
                               "not pickled; call extend/extend_batch in the process that "
                               "writes")

    def native(self, backend: Backend, device: Device, group: int = 0) -> Any:
        """The slots of layer group ``group`` as ``backend``'s index array on ``device``
        (cached)."""
        key = (backend.name, device, group)
        index = self._native.get(key)
        if index is None:
            slots = self.group_slots[group] if self.group_slots else self.slots
            index = backend.index_array(slots, device)
            self._native[key] = index
        return index


@dataclass(frozen=True)
class FlashInferPageTable:
    """A batch's pages in FlashInfer's CSR form (``BatchDecodeWithPagedKVCacheWrapper.plan``).

    Sequence ``i`` uses pages ``indices[indptr[i]:indptr[i + 1]]``; its last page holds
    ``last_page_len[i]`` tokens.  All ``int32``.
    """

    indptr: np.ndarray
    indices: np.ndarray
    last_page_len: np.ndarray
    page_size: int

    @classmethod
    def from_tables(cls, tables: Sequence[BlockTable], page_size: int) -> FlashInferPageTable:
        counts = np.fromiter((t.num_blocks for t in tables), np.int32, len(tables))
        indptr = np.zeros(len(tables) + 1, dtype=np.int32)
        np.cumsum(counts, out=indptr[1:])
        indices = np.fromiter(itertools.chain.from_iterable(t._blocks for t in tables),
                              np.int32, int(indptr[-1]))
        lengths = np.fromiter((t.sequence_length for t in tables), np.int32, len(tables))
        last = np.where(lengths > 0, (lengths - 1) % page_size + 1, 0).astype(np.int32)
        return cls(indptr, indices, last, page_size)

    @classmethod
    def from_arrays(cls, blocks: np.ndarray, num_blocks: np.ndarray, lengths: np.ndarray,
                    page_size: int) -> FlashInferPageTable:
        """From a ``[batch, width]`` block array (rows padded past ``num_blocks``)."""
        counts = np.asarray(num_blocks, dtype=np.int32)
        indptr = np.zeros(counts.size + 1, dtype=np.int32)
        np.cumsum(counts, out=indptr[1:])
        mask = np.arange(blocks.shape[1] if blocks.ndim == 2 else 0) < counts[:, None]
        indices = blocks[mask].astype(np.int32)
        lens = np.asarray(lengths, dtype=np.int32)
        last = np.where(lens > 0, (lens - 1) % page_size + 1, 0).astype(np.int32)
        return cls(indptr, indices, last, page_size)


@dataclass(frozen=True)
class VllmBlockTable:
    """A batch's pages as vLLM's attention metadata takes them: ``block_tables``
    ``[batch, max_blocks]`` padded with ``pad_value``, and ``seq_lens``.  ``int32``."""

    block_tables: np.ndarray
    seq_lens: np.ndarray
    block_size: int
    pad_value: int = 0

    @classmethod
    def from_tables(cls, tables: Sequence[BlockTable], block_size: int,
                    pad_value: int = 0) -> VllmBlockTable:
        width = max((t.num_blocks for t in tables), default=0)
        out = np.full((len(tables), width), pad_value, dtype=np.int32)
        for i, t in enumerate(tables):  # one row copy per sequence, no per-block work
            out[i, :t.num_blocks] = t._blocks
        lengths = np.fromiter((t.sequence_length for t in tables), np.int32, len(tables))
        return cls(out, lengths, block_size, pad_value)

    @classmethod
    def from_arrays(cls, blocks: np.ndarray, num_blocks: np.ndarray, lengths: np.ndarray,
                    block_size: int, pad_value: int = 0) -> VllmBlockTable:
        """From a ``[batch, width]`` block array (rows padded past ``num_blocks``)."""
        counts = np.asarray(num_blocks)
        width = int(counts.max(initial=0))
        out = blocks[:, :width].astype(np.int32)
        out[np.arange(width) >= counts[:, None]] = pad_value
        return cls(out, np.asarray(lengths, dtype=np.int32), block_size, pad_value)
