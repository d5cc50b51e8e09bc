"""A backend pool beside its dense host mirror, every operation checked on its own clause.

The direct backend tests drive pools through :class:`PoolModel`.  Each operation is
called inside :func:`blame` of the clause it belongs to, its returned pool is checked
(``backend.returns-pool``, and ``capabilities.mutable-pools`` for mutable backends), the
mirror is updated the way the contract says, and (unless the caller opts out) the whole
pool is compared with the mirror at once, under the caller's clause.  So whatever test
an operation runs in, a broken operation is reported under its own clause before any
later check can trip over its result: the first red line names the culprit.

Every call continues with the pool the operation returned, never with the one passed
in, so backends with immutable arrays (``mutable_pools=False``) run the same tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kvcore import Device

from .._clauses import (
    ALLOCATE_LAYER,
    COPY_BLOCKS,
    FROM_NUMPY,
    GATHER_ORDER,
    INDEX_ARRAY,
    MUTABLE_POOLS,
    PLANES,
    RETURNS_POOL,
    SCATTER,
    SCATTER_OVERWRITE,
    TO_NUMPY,
    TRANSFER_BLOCKS,
    Clause,
    blame,
    check,
    check_equal,
    fail,
)
from .._data import assert_same_bits, hashed_kv, host_dtype
from ._harness import Harness

__all__ = ["PoolModel", "check_returned"]


def _short(values: np.ndarray) -> str:
    flat = np.asarray(values).reshape(-1).tolist()
    text = str(flat[:12])
    return text[:-1] + f", ... ({len(flat)} in all)]" if len(flat) > 12 else text


def check_returned(h: Harness, op: str, passed: Any, returned: Any,
                   facts: tuple[tuple[int, ...], Any, Device]) -> None:
    """``returned`` (what ``op`` gave back) is a pool with the ``facts`` (shape, dtype,
    device) of the pool passed in; for a mutable backend, the very same object."""
    if returned is None:
        fail(RETURNS_POOL, f"{op} returned None: API version 2 operations return the pool "
             "now holding the data (a mutable backend returns the pool it was given)")
    try:
        shape, dtype, device = h.backend.describe(returned)
    except Exception as exc:  # noqa: BLE001  (what it returned is not an array at all)
        fail(RETURNS_POOL, f"{op} returned {type(returned).__name__}, which describe() "
             f"refuses: {type(exc).__name__}: {exc}")
    check_equal((tuple(shape), dtype, device), facts, RETURNS_POOL,
                f"{op} returned a pool of other (shape, dtype, device) than it was given")
    if h.backend.capabilities().mutable_pools:
        check(returned is passed, MUTABLE_POOLS, f"{op} returned a new object although the "
              "backend declares mutable_pools=True (views of the pool would miss the write)",
              seen=f"{type(returned).__name__} at {id(returned):#x}",
              expected=f"the pool passed in, at {id(passed):#x}")


class PoolModel:
    """One pool of the backend under test and what it must hold."""

    def __init__(self, h: Harness, num_blocks: int, block_size: int, *, planes: int = 2,
                 device: Device | None = None, heads: int | None = None,
                 dim: int | None = None, pinned: bool = False,
                 clause: Clause = ALLOCATE_LAYER) -> None:
        self.h = h
        self.be = h.backend
        self.device = device or h.device
        self.planes, self.blocks, self.bs = planes, num_blocks, block_size
        self.heads = heads if heads is not None else h.heads
        self.dim = dim if dim is not None else h.dim
        self.shape = (planes, num_blocks, block_size, self.heads, self.dim)
        with blame(clause, f"allocate_layer{self.shape[1:]} (planes={planes}, "
                   f"{h.dtype.value}, {self.device}, pinned={pinned})"):
            self.pool = self.be.allocate_layer(num_blocks, block_size, self.heads, self.dim,
                                               h.dtype, self.device, pinned=pinned,
                                               planes=planes)
            shape, dtype, where = self.be.describe(self.pool)
        check_equal((tuple(shape), dtype, where), self.facts, clause,
                    f"allocate_layer(..., planes={planes}) as (shape, dtype, device)")
        self.mirror = np.zeros(self.shape, host_dtype(h.dtype))
        # Slots written since allocation: a scatter over any of them is an overwrite,
        # and is judged as backend.scatter.overwrite (never as backend.scatter).
        self.written = np.zeros(self.slots, bool)

    def __repr__(self) -> str:
        return f"PoolModel({list(self.shape)}, {self.h.dtype.value}, {self.device})"

    @property
    def facts(self) -> tuple[tuple[int, ...], Any, Device]:
        return self.shape, self.h.dtype, self.device

    @property
    def slots(self) -> int:
        return self.blocks * self.bs

    def rows_of(self, host: np.ndarray) -> np.ndarray:
        """The mirror's ``[planes, slots, heads, dim]`` view."""
        return host.reshape(self.planes, self.slots, self.heads, self.dim)

    # --- conversions, each blamed on its own clause ------------------------------------

    def index(self, values: Any, device: Device | None = None) -> Any:
        array = np.asarray(values, dtype=np.int64)
        with blame(INDEX_ARRAY, f"index_array({_short(array)})"):
            return self.be.index_array(array, device or self.device)

    def native(self, host: np.ndarray) -> Any:
        with blame(FROM_NUMPY, f"from_numpy(<{host.dtype} {list(host.shape)}>, "
                   f"{self.h.dtype.value}, {self.device})"):
            return self.be.from_numpy(host, self.h.dtype, self.device)

    def host(self) -> np.ndarray:
        with blame(TO_NUMPY, f"to_numpy of a pool {list(self.shape)}"):
            self.be.synchronize(self.device)
            return self.be.to_numpy(self.pool)

    def verify(self, clause: Clause, what: str) -> None:
        """The whole pool holds exactly the mirror (every plane, slots as rows)."""
        got = self.host()
        if not isinstance(got, np.ndarray) or got.shape != self.shape:
            assert_same_bits(clause, got, self.mirror, self.h.dtype, f"{what}: the whole pool")
        for p in range(self.planes):
            assert_same_bits(clause, self.rows_of(got)[p], self.rows_of(self.mirror)[p],
                             self.h.dtype, f"{what}: plane {p} of the pool (slots as rows)")

    def _clause(self, given: Clause, default: Clause) -> Clause:
        """The clause an operation is judged by: a one-plane pool's operations are
        ``backend.planes``' business, whatever test calls them."""
        return PLANES if given is default and self.planes == 1 else given

    def _returned(self, op: str, passed: Any, returned: Any, target: PoolModel) -> None:
        check_returned(self.h, op, passed, returned, target.facts)
        target.pool = returned

    # --- the operations -----------------------------------------------------------------

    def scatter(self, slots: Sequence[int] | np.ndarray, rows: Sequence[np.ndarray], *,
                clause: Clause = SCATTER, verify: bool = True, what: str = "",
                index: Any = None) -> None:
        """``scatter(pool, slots, rows)`` with host ``rows`` (one per plane); ``index``
        is a ready index to pass instead of ``index_array(slots)``."""
        slots = np.array(slots, dtype=np.int64)
        if np.unique(slots).size != slots.size:  # the contract's precondition, not a check
            raise ValueError(f"conformance suite error: scatter slots repeat: {slots.tolist()}")
        if clause is SCATTER and self.written[slots].any():
            clause = SCATTER_OVERWRITE
        clause = self._clause(clause, SCATTER)
        index = self.index(slots) if index is None else index
        natives = [self.native(r) for r in rows]
        op = f"scatter(pool, slots={_short(slots)}, rows=<{len(rows)} planes>)"
        passed = self.pool
        with blame(clause, op):
            returned = self.be.scatter(passed, index, natives)
        self._returned("scatter", passed, returned, self)
        for p, r in enumerate(rows):
            self.rows_of(self.mirror)[p, slots] = r
        self.written[slots] = True
        if verify:
            self.verify(clause, f"{what or 'after'} {op}")

    def gather(self, plane: int, slots: Any, *, clause: Clause = GATHER_ORDER,
               index: Any = None, what: str = "") -> np.ndarray:
        """``gather(pool, plane, slots)``, checked against the mirror; returns the host copy."""
        slots = np.asarray(slots, dtype=np.int64)
        clause = self._clause(clause, GATHER_ORDER)
        index = self.index(slots) if index is None else index
        op = f"gather(pool, plane={plane}, slots={_short(slots)} of shape {list(slots.shape)})"
        with blame(clause, op):
            out = self.be.gather(self.pool, plane, index)
            got = self.h.host(out)
        assert_same_bits(clause, got, self.rows_of(self.mirror)[plane][slots], self.h.dtype,
                         f"{what}{': ' if what else ''}{op}")
        return got

    def copy_blocks(self, src: Sequence[int], dst: Sequence[int], *,
                    clause: Clause = COPY_BLOCKS, verify: bool = True) -> None:
        src_a, dst_a = np.asarray(src, np.int64), np.asarray(dst, np.int64)
        clause = self._clause(clause, COPY_BLOCKS)
        op = f"copy_blocks(pool, src={src_a.tolist()}, dst={dst_a.tolist()})"
        src_i, dst_i = self.index(src_a), self.index(dst_a)
        passed = self.pool
        with blame(clause, op):
            returned = self.be.copy_blocks(passed, src_i, dst_i)
        self._returned("copy_blocks", passed, returned, self)
        self.mirror[:, dst_a] = self.mirror[:, src_a]
        self._blocks_written(dst_a)
        if verify:
            self.verify(clause, f"after {op}")

    def transfer_to(self, other: PoolModel, src: Sequence[int], dst: Sequence[int], *,
                    clause: Clause = TRANSFER_BLOCKS, verify: bool = True) -> None:
        """``transfer_blocks(self.pool, src, other.pool, dst)``."""
        src_a, dst_a = np.asarray(src, np.int64), np.asarray(dst, np.int64)
        clause = self._clause(clause, TRANSFER_BLOCKS)
        op = (f"transfer_blocks(pool on {self.device}, src={src_a.tolist()}, pool on "
              f"{other.device}, dst={dst_a.tolist()})")
        src_i, dst_i = self.index(src_a), other.index(dst_a)
        passed = other.pool
        with blame(clause, op):
            returned = self.be.transfer_blocks(self.pool, src_i, passed, dst_i)
            self.be.synchronize(other.device)
        self._returned("transfer_blocks", passed, returned, other)
        other.mirror[:, dst_a] = self.mirror[:, src_a]
        other._blocks_written(dst_a)
        if verify:
            other.verify(clause, f"destination after {op}")

    def _blocks_written(self, blocks: np.ndarray) -> None:
        self.written.reshape(self.blocks, self.bs)[blocks] = True

    def ordinary(self, n: int) -> np.ndarray:
        """``n`` fresh rows of ordinary values in this pool's shape."""
        keys = self.h.rng.integers(0, 2**62, size=n, dtype=np.int64)
        return hashed_kv(keys, self.heads, self.dim, self.h.dtype)

    def fill(self, clause: Clause = SCATTER) -> None:
        """Every slot of every plane gets its own ordinary row (one scatter, verified)."""
        self.scatter(np.arange(self.slots), [self.ordinary(self.slots)
                                             for _ in range(self.planes)],
                     clause=clause, what="filling the pool:")
