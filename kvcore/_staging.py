"""Chunked block transfers between a GPU pool and a host (or another GPU) pool.

Written once for every GPU backend: a backend supplies a :class:`StagingOps` (a dozen
one-line array operations) and gets swap transfers that

* never hold more than two chunks of temporaries on the GPU (a swap under memory
  pressure must not need a full-size copy of what it moves);
* move data asynchronously through pinned (page-locked) host memory: straight into or
  out of the host pool when the host blocks are one consecutive run (the pool itself
  is pinned), otherwise through two pinned staging buffers used in turn, so the copy of
  one chunk overlaps the host-side gather or scatter of the other;
* hand back, as :class:`Pending` jobs, what is still in flight when the call returns,
  so the backend finishes it (waiting on the transfer's own events, never the whole
  device) before anyone can read a half-landed transfer.

Nothing here imports an array library: the operations arrive through ``ops``, so the
logic is tested on the CPU with a simulated asynchronous device
(``tests/test_staging.py``).  A chunk is a run of whole blocks; the number of chunks
grows with the bytes moved (``chunk_bytes``, 64 MiB by default), never with the number
of tokens, so a swap costs a handful of calls per layer.
"""

from __future__ import annotations

import abc
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["DEFAULT_CHUNK_BYTES", "ENV_CHUNK_BYTES", "Pending", "StagingOps", "Transfer",
           "chunk_bytes_from_env", "consecutive_start"]

#: Bytes moved per chunk unless ``KVCORE_TRANSFER_CHUNK_BYTES`` says otherwise.  Large
#: enough that per-chunk launch costs vanish next to the copy (64 MiB is ~3 ms over
#: PCIe 4), small enough to fit beside a nearly full GPU.
DEFAULT_CHUNK_BYTES = 64 << 20
ENV_CHUNK_BYTES = "KVCORE_TRANSFER_CHUNK_BYTES"


def chunk_bytes_from_env() -> int:
    """``KVCORE_TRANSFER_CHUNK_BYTES`` as a positive int, else the default."""
    text = os.environ.get(ENV_CHUNK_BYTES, "").strip()
    if not text:
        return DEFAULT_CHUNK_BYTES
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{ENV_CHUNK_BYTES}={text!r} is not an integer number of "
                         "bytes") from None
    if value < 1:
        raise ValueError(f"{ENV_CHUNK_BYTES}={value} must be at least 1 byte")
    return value


def consecutive_start(ids: np.ndarray) -> int | None:
    """The first id when ``ids`` are ``a, a + 1, a + 2, ...`` (one run of blocks that a
    single slice covers), else ``None``."""
    if ids.size == 0:
        return None
    first = int(ids[0])
    if ids.size == 1 or np.array_equal(ids, np.arange(first, first + ids.size)):
        return first
    return None


class StagingOps(abc.ABC):
    """What a GPU backend gives :class:`Transfer`: whole-block array operations.

    Pools are ``[planes, blocks, ...]`` arrays.  ``*_index`` arguments are the
    backend's index arrays (on the pool's device), ``ids`` are numpy ``int64``.  Every
    device operation is enqueued on the current stream of the array's device and
    returns without waiting for it; only :meth:`wait` blocks the host.
    """

    @abc.abstractmethod
    def take(self, pool: Any, index: Any) -> Any:
        """A new contiguous device array of the blocks ``index`` of ``pool``."""

    @abc.abstractmethod
    def put(self, pool: Any, index: Any, values: Any) -> None:
        """Device scatter: ``pool[:, index] = values``."""

    @abc.abstractmethod
    def part(self, index: Any, lo: int, hi: int) -> Any:
        """``index[lo:hi]`` without a copy."""

    @abc.abstractmethod
    def to_host(self, src: Any, parts: Sequence[Any]) -> None:
        """Asynchronous device -> host copy of plane ``p`` of ``src`` into ``parts[p]``
        (contiguous host arrays, pinned for the copy to be asynchronous)."""

    @abc.abstractmethod
    def to_device(self, parts: Sequence[Any], like: Any) -> Any:
        """A new device array on ``like``'s device whose plane ``p`` is ``parts[p]``,
        copied asynchronously."""

    @abc.abstractmethod
    def to_peer(self, src: Any, like: Any) -> Any:
        """``src`` copied to ``like``'s (other) GPU, ordered after the work on both
        devices' current streams."""

    @abc.abstractmethod
    def record(self, like: Any) -> Any:
        """An event recorded now on the current stream of ``like``'s device."""

    @abc.abstractmethod
    def wait(self, event: Any) -> None:
        """Block the host until ``event`` has completed."""

    @abc.abstractmethod
    def pinned(self, numel: int, like: Any) -> Any:
        """A one-dimensional pinned host buffer of ``numel`` elements of ``like``'s
        dtype (contents undefined)."""

    @abc.abstractmethod
    def view(self, buffer: Any, shape: tuple[int, ...]) -> Any:
        """The first ``prod(shape)`` elements of ``buffer`` as a contiguous array."""

    @abc.abstractmethod
    def host_take(self, pool: Any, ids: np.ndarray, out: Any) -> None:
        """Host gather: ``out[...] = pool[:, ids]``."""

    @abc.abstractmethod
    def host_put(self, pool: Any, ids: np.ndarray, values: Any) -> None:
        """Host scatter: ``pool[:, ids] = values``."""

    @abc.abstractmethod
    def plane(self, array: Any, p: int, lo: int | None = None,
              hi: int | None = None) -> Any:
        """``array[p, lo:hi]`` (contiguous for a contiguous pool) without a copy."""


@dataclass
class Pending:
    """Work still in flight: ``land`` (host-side, may be ``None``) runs once ``event``
    has completed; ``keep`` holds buffers the device may still read or write."""

    event: Any
    land: Callable[[], None] | None = None
    keep: tuple[Any, ...] = ()

    def finish(self, ops: StagingOps) -> None:
        ops.wait(self.event)
        if self.land is not None:
            self.land()
        self.land = None
        self.keep = ()


class _Stage:
    """One pinned staging buffer and the job that still uses it."""

    __slots__ = ("buffer", "job")

    def __init__(self) -> None:
        self.buffer: Any = None
        self.job: Pending | None = None


class Transfer:
    """One transfer call of a backend (any number of layers), chunk by chunk.

    Call :meth:`d2h`, :meth:`h2d` or :meth:`d2d` once per layer, then :meth:`close`
    for the jobs still in flight (the backend keeps them until its ``synchronize``).
    On an exception, call :meth:`abort`: it waits for what was already queued, so no
    buffer is reused under a running copy, and lands nothing more.
    """

    def __init__(self, ops: StagingOps, chunk_bytes: int) -> None:
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        self.ops = ops
        self.chunk_bytes = int(chunk_bytes)
        self._stages = (_Stage(), _Stage())
        self._turn = 0
        self._jobs: list[Pending] = []
        #: The largest number of blocks one chunk moved (for tests and benches).
        self.max_chunk_blocks = 0
        #: The event recorded after the last :meth:`h2d` layer (the transfer's own).
        self.last_event: Any = None

    # --- planning -----------------------------------------------------------------

    def blocks_per_chunk(self, pool: Any) -> int:
        """How many whole blocks of ``pool`` one chunk moves (at least one)."""
        shape = tuple(int(s) for s in pool.shape)
        block_bytes = math.prod(shape[2:]) * shape[0] * int(pool.dtype.itemsize)
        return max(1, self.chunk_bytes // max(1, block_bytes))

    def _chunks(self, n: int, pool: Any) -> list[tuple[int, int]]:
        step = self.blocks_per_chunk(pool)
        spans = [(lo, min(lo + step, n)) for lo in range(0, n, step)]
        if spans:
            self.max_chunk_blocks = max(self.max_chunk_blocks, spans[0][1] - spans[0][0])
        return spans

    def _stage(self, numel: int, like: Any) -> _Stage:
        """The next staging buffer, once the copy that last used it has finished."""
        stage = self._stages[self._turn]
        self._turn ^= 1
        if stage.job is not None:
            job, stage.job = stage.job, None
            job.finish(self.ops)
        if stage.buffer is None or int(stage.buffer.shape[0]) < numel:
            stage.buffer = self.ops.pinned(numel, like)
        return stage

    # --- directions ---------------------------------------------------------------

    def d2h(self, src_pool: Any, src_index: Any, dst_pool: Any, dst_ids: np.ndarray) -> None:
        """Blocks ``src_index`` of a GPU pool to blocks ``dst_ids`` of a host pool."""
        ops = self.ops
        block_shape = tuple(int(s) for s in src_pool.shape[2:])
        planes = int(src_pool.shape[0])
        for lo, hi in self._chunks(int(dst_ids.shape[0]), src_pool):
            picked = ops.take(src_pool, ops.part(src_index, lo, hi))
            run = consecutive_start(dst_ids[lo:hi])
            if run is not None:  # straight into the (pinned) pool: no host copy at all
                ops.to_host(picked, [ops.plane(dst_pool, p, run, run + hi - lo)
                                     for p in range(planes)])
                self._jobs.append(Pending(ops.record(src_pool)))
                continue
            shape = (planes, hi - lo) + block_shape
            stage = self._stage(math.prod(shape), src_pool)
            staged = ops.view(stage.buffer, shape)
            ops.to_host(picked, [ops.plane(staged, p) for p in range(planes)])
            ids = dst_ids[lo:hi]
            stage.job = Pending(ops.record(src_pool),
                                land=lambda ids=ids, staged=staged: ops.host_put(dst_pool, ids, staged),
                                keep=(stage.buffer,))

    def h2d(self, src_pool: Any, src_ids: np.ndarray, dst_pool: Any, dst_index: Any) -> None:
        """Blocks ``src_ids`` of a host pool to blocks ``dst_index`` of a GPU pool."""
        ops = self.ops
        block_shape = tuple(int(s) for s in dst_pool.shape[2:])
        planes = int(dst_pool.shape[0])
        for lo, hi in self._chunks(int(src_ids.shape[0]), dst_pool):
            run = consecutive_start(src_ids[lo:hi])
            if run is not None:  # straight out of the (pinned) pool
                values = ops.to_device([ops.plane(src_pool, p, run, run + hi - lo)
                                        for p in range(planes)], dst_pool)
            else:
                shape = (planes, hi - lo) + block_shape
                stage = self._stage(math.prod(shape), dst_pool)
                staged = ops.view(stage.buffer, shape)
                ops.host_take(src_pool, src_ids[lo:hi], staged)
                values = ops.to_device([ops.plane(staged, p) for p in range(planes)],
                                       dst_pool)
                stage.job = Pending(ops.record(dst_pool), keep=(stage.buffer,))
            ops.put(dst_pool, ops.part(dst_index, lo, hi), values)
        # The host pool is read until here: no host-side write may touch it earlier.
        self.last_event = ops.record(dst_pool)
        self._jobs.append(Pending(self.last_event))

    def d2d(self, src_pool: Any, src_index: Any, dst_pool: Any, dst_index: Any, *,
            peer: bool) -> None:
        """Blocks between two GPU pools (``peer``: on different GPUs)."""
        ops = self.ops
        n = int(src_index.shape[0])
        for lo, hi in self._chunks(n, src_pool):
            values = ops.take(src_pool, ops.part(src_index, lo, hi))
            if peer:
                values = ops.to_peer(values, dst_pool)
            ops.put(dst_pool, ops.part(dst_index, lo, hi), values)

    # --- ending -------------------------------------------------------------------

    def close(self) -> list[Pending]:
        """The jobs still in flight, oldest first; the transfer object is spent."""
        jobs = self._jobs + [s.job for s in self._stages if s.job is not None]
        self._jobs = []
        for stage in self._stages:
            stage.job = None
        return jobs

    def abort(self) -> None:
        """After a failure: wait for every queued copy (so no staging buffer is reused
        under it) and drop the landings; the destination blocks hold garbage the
        caller must not keep."""
        jobs = self.close()
        for job in jobs:
            job.land = None
            try:
                job.finish(self.ops)
            except Exception:  # noqa: BLE001, S110 - the original failure is the one to report
                pass
