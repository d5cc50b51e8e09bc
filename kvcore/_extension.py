"""Growing and shrinking sequences: extend (one sequence or a whole decode step),
continued prefix hashing, and truncate."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ._block_table import _check_count, _slots_of
from ._manager_state import ManagerState
from ._prefix_cache import token_array
from ._sequence import _Sequence
from ._slot_mapping import SlotMapping
from .errors import CapacityError, OutOfBlocksError

if TYPE_CHECKING:
    from ._paged_handle import PagedKvCacheHandle

__all__ = ["ExtendMixin"]


def _check_positive(name: str, value: Any) -> int:
    """:func:`_check_count` (a TypeError for anything but an int), refusing 0 too."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return _check_count(name, value)


class ExtendMixin(ManagerState):
    """``extend``, ``extend_batch`` and ``truncate`` of :class:`~kvcore.KvCacheManager`."""

    def extend(self, handle: PagedKvCacheHandle | str, num_tokens: int, *,
               token_ids: Sequence[int] | None = None) -> SlotMapping:
        """Reserve room for ``num_tokens`` more tokens; returns their slots.

        Pass ``token_ids`` to keep prefix-caching the blocks they fill.  A shared last
        block is copied first (copy-on-write).  All or nothing: on
        :class:`~kvcore.errors.OutOfBlocksError` nothing changed.
        """
        return self.extend_batch([handle], num_tokens,
                                 token_ids=None if token_ids is None else [token_ids])

    def extend_batch(self, handles: Sequence[PagedKvCacheHandle | str], num_tokens: int = 1,
                     *, token_ids: Sequence[Sequence[int]] | None = None) -> SlotMapping:
        """:meth:`extend` for many sequences at once (one decode step of a batch).

        One :class:`SlotMapping` covers them all, sequences in the order given; the
        copy-on-write copies of the whole batch are one backend call per layer.
        """
        n = _check_positive("num_tokens", num_tokens)
        with self._lock:
            self._decode = None
            seqs = self._live_batch(handles)
            if len(set(map(id, seqs))) != len(seqs):
                raise ValueError("extend_batch: a sequence appears more than once in the batch")
            if token_ids is not None:
                if len(token_ids) != len(seqs):
                    raise ValueError(f"token_ids has {len(token_ids)} entries for "
                                     f"{len(seqs)} sequences")
                for ids in token_ids:
                    if len(ids) != n:
                        raise ValueError(f"token_ids entry of length {len(ids)} differs from "
                                         f"num_tokens={n}")
            if n == 1 and token_ids is None:
                mapping = self._extend_one(seqs)
                if mapping is not None:
                    return mapping
            pool = self._pool
            cow = [s.table.has_free_space and s.table._blocks and
                   pool.ref[s.table._blocks[-1]] > 1 for s in seqs]
            need = sum(s.table.additional_blocks_for(n) for s in seqs) + sum(map(bool, cow))
            if need > pool.num_free:
                self._failures += 1
                raise OutOfBlocksError(f"extending {len(seqs)} sequence(s) by {n} tokens needs "
                                       f"{need} blocks but only {pool.num_free} are free")
            # From here on nothing can fail: the pool has room for everything.
            src: list[int] = []
            dst: list[int] = []
            starts = []
            for seq, copy in zip(seqs, cow):
                table = seq.table
                if copy:
                    new = self._take(1)[0]
                    src.append(table._blocks[-1])
                    dst.append(new)
                    pool.free([table._blocks[-1]])
                    table._blocks[-1] = new
                    seq.private_from = min(seq.private_from, len(table._blocks) - 1)
                    self._versions[seq.row] += 1
                grow = table.additional_blocks_for(n)
                if grow:
                    table._blocks.extend(self._take(grow))
                starts.append(table._length)
                table._length += n
                seq.blocks_changed()
                seq.last_access = time.time()
            if src:
                self._copy_blocks(src, dst)
            if self._config.enable_prefix_caching:
                for i, seq in enumerate(seqs):
                    if seq.hashing:
                        self._hash_new_blocks(seq, None if token_ids is None else token_ids[i])
            mapping = self._mapping(seqs, starts, n)
            self._after_change()
            return mapping

    def _live_batch(self, handles: Sequence[PagedKvCacheHandle | str]) -> list[_Sequence]:
        """The sequences of ``handles``, all live and resident, else the error the
        one-by-one checks raise.  The common case (this manager's own handles) costs
        two attribute reads per handle."""
        cls = self._backend.handle_class
        seqs = []
        append = seqs.append
        for h in handles:
            if type(h) is cls and h._manager is self:
                seq = h._seq
                if seq.valid and seq.swap_blocks is None:
                    append(seq)
                    continue
            break
        else:
            return seqs
        seqs = [self._seq_of(h, "extend") for h in handles]
        for seq in seqs:
            self._require_data(seq, "extend")
        return seqs

    def _extend_one(self, seqs: list[_Sequence]) -> SlotMapping | None:
        """The decode step: every sequence grows by one token, none shares its last
        block.  Same result as the general path (same blocks, taken in the same order,
        same errors) in one pass per sequence instead of a dozen method calls; returns
        ``None`` (having changed nothing) when a sequence needs copy-on-write."""
        bs = self._config.block_size
        ref = self._pool.ref
        growing: list[_Sequence] = []
        for seq in seqs:
            table = seq.table
            blocks = table._blocks
            if table._length == len(blocks) * bs:
                growing.append(seq)
            elif ref[blocks[-1]] > 1:
                return None  # copy-on-write: the general path handles it
        pool = self._pool
        if len(growing) > pool.num_free:
            self._failures += 1
            raise OutOfBlocksError(f"extending {len(seqs)} sequence(s) by 1 tokens needs "
                                   f"{len(growing)} blocks but only {pool.num_free} are free")
        if growing:
            for seq, block in zip(growing, self._take(len(growing))):
                seq.table._blocks.append(block)
                seq.block_arr = None
                seq.read_key = None
        now = time.time()
        starts = []
        slots = []
        completes = []  # blocks whose last slot this step writes
        last = bs - 1
        for seq in seqs:
            table = seq.table
            length = table._length
            starts.append(length)
            block = table._blocks[length // bs]
            offset = length % bs
            slots.append(block * bs + offset)
            if offset == last:
                completes.append(block)
            table._length = length + 1
            seq.last_access = now
        if self._config.enable_prefix_caching:
            for seq in seqs:
                if seq.hashing:  # no token ids: the chain is broken
                    self._hash_new_blocks(seq, None)
        rows = np.array([s.row for s in seqs], dtype=np.int64)
        start_arr = np.array(starts, dtype=np.int64)
        mapping = SlotMapping(slots=np.array(slots, dtype=np.int64), rows=rows,
                              starts=start_arr, ends=start_arr + 1,
                              versions=self._versions[rows],
                              request_ids=tuple([s.request_id for s in seqs]))
        self._after_change()
        # Precompute, once per step, what write_slots would check on every layer.
        # Which layers are written up to the starts, so writing leaves no gap: written
        # never exceeds a sequence's length (= its start here), so "every row is
        # written up to its start" is "the written counts sum to the starts' sum".
        ok = self._written[rows].sum(axis=0) == sum(starts)
        done = np.array(completes, dtype=np.int64)
        # Valid until something moves a slot (_after_change) or another extend.
        self._decode = (mapping, ok, done)
        return mapping

    def _hash_new_blocks(self, seq: _Sequence, token_ids: Sequence[int] | None) -> None:
        if token_ids is None:  # the chain is broken: later blocks can't be cached
            seq.hashing = False
            seq.pending_tokens = []
            return
        pending = seq.pending_tokens
        pending.extend(int(t) for t in token_ids)
        bs = self._config.block_size
        full = len(pending) // bs
        if full:
            rows = token_array(pending[:full * bs]).reshape(full, bs)
            keys = self._hasher.keys(rows, seq.parent_hash).tolist()
            first = seq.num_hashed_blocks
            self._pool.register_run(seq.table._blocks[first:first + full], keys, rows, 0)
            seq.parent_hash = keys[-1]
            seq.num_hashed_blocks += full
            del pending[:full * bs]

    def _mapping(self, seqs: list[_Sequence], starts: list[int], n: int) -> SlotMapping:
        bs = self._config.block_size
        if n == 1:  # the decode step: one slot per sequence, no arrays per sequence
            slots = np.fromiter((s.table._blocks[p // bs] * bs + p % bs
                                 for s, p in zip(seqs, starts)), dtype=np.int64, count=len(seqs))
        else:
            slots = np.concatenate([
                _slots_of(s.blocks(), bs, np.arange(p, p + n, dtype=np.int64))
                for s, p in zip(seqs, starts)]) if seqs else np.zeros(0, np.int64)
        rows = np.fromiter((s.row for s in seqs), dtype=np.int64, count=len(seqs))
        start_arr = np.asarray(starts, dtype=np.int64)
        return SlotMapping(slots=slots, rows=rows, starts=start_arr, ends=start_arr + n,
                           versions=self._versions[rows].copy(),
                           request_ids=tuple(s.request_id for s in seqs))

    def truncate(self, handle: PagedKvCacheHandle | str, num_tokens: int) -> None:
        """Shorten a sequence to its first ``num_tokens`` tokens (speculative decoding
        rolling back rejected draft tokens; transformers' ``Cache.crop``).

        Blocks past the new end go back to the pool.  If the new last block is partly
        used and shared with another sequence or held by the prefix cache, the sequence
        gets its own copy first, so the tokens it writes next never change anyone
        else's data.  All or nothing.
        """
        with self._lock:
            seq = self._seq_of(handle, "truncate")
            self._require_data(seq, "truncate")
            length = seq.table._length
            if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, np.integer)):
                raise TypeError(f"num_tokens must be an int, got {num_tokens!r}")
            if not 0 <= num_tokens <= length:
                raise CapacityError(f"cannot truncate request {seq.request_id!r} to "
                                    f"{num_tokens} tokens: it holds {length}")
            num_tokens = int(num_tokens)
            if num_tokens == length:
                return
            pool, bs = self._pool, self._config.block_size
            blocks = seq.table._blocks
            keep = -(-num_tokens // bs)
            dropped = blocks[keep:]
            last = blocks[keep - 1] if keep and num_tokens % bs else None
            copy = last is not None and (pool.ref[last] > 1 or pool.is_cached(last))
            if copy and pool.num_free + pool.count_free_after(dropped) < 1:
                self._failures += 1
                raise OutOfBlocksError(f"truncating request {seq.request_id!r} needs one "
                                       "block to copy its shared last block; none is free")
            # From here on nothing can fail.
            del blocks[keep:]
            pool.free(dropped)
            if copy:
                fresh = self._take(1)
                self._copy_blocks([last], fresh)  # type: ignore[list-item]
                blocks[keep - 1] = fresh[0]
                pool.free([last])  # type: ignore[list-item]
                last = fresh[0]
            if last is not None:
                # Its tail will be written again: it is no longer complete for any layer.
                self._filled[last] = False
                self._complete[last] = False
            seq.table._length = num_tokens
            np.minimum(self._written[seq.row], num_tokens, out=self._written[seq.row])
            seq.num_cached_tokens = min(seq.num_cached_tokens, num_tokens)
            seq.private_from = min(seq.private_from, keep - 1 if copy else keep)
            if seq.hashing:
                hashed = seq.num_hashed_blocks * bs
                if num_tokens < hashed:  # the chain cannot be rewound: stop caching it
                    seq.hashing = False
                    seq.pending_tokens = []
                else:
                    del seq.pending_tokens[num_tokens - hashed:]
            seq.blocks_changed()
            self._versions[seq.row] += 1
            self._after_change()
