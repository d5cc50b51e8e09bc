"""The chunked swap engine (kvcore._staging) on the CPU, against a simulated GPU.

``SimulatedGpu`` is torch's real staging adapter (``kv_torch._cuda.TorchStagingOps``)
with the asynchronous parts replaced by a stream that runs copies only when the host
waits on an event recorded after them: a device -> host copy lands in its host buffer
at that wait, and a host -> device copy checks, at that wait, that nobody wrote the
host buffer it reads in between.  So a missing wait shows up as wrong data or a
"reused before its copy ran" failure, as it would on a GPU; and every temporary is
measured, so the bounds (two chunks on the device, two pinned staging buffers) are
proven.  Two deliberately broken engines below show both checks can fail.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from kv_torch._cuda import TorchStagingOps

from kvcore._staging import (DEFAULT_CHUNK_BYTES, ENV_CHUNK_BYTES, Pending, Transfer,
                             chunk_bytes_from_env, consecutive_start)

SHAPE = (2, 4, 2, 3)  # planes, block_size, heads, dim: 48 floats = 192 bytes a block
BLOCK_BYTES = math.prod(SHAPE) * 4


class Event:
    def __init__(self, seq: int) -> None:
        self.seq = seq


class SimulatedGpu(TorchStagingOps):
    """One in-order stream; copies run when the host waits on a later event."""

    def __init__(self) -> None:
        self.queue: list[Any] = []  # closures in stream order
        self.ran = 0  # how many of them have run
        self.pinned_sizes: list[int] = []
        self.device_blocks: list[int] = []  # blocks held by each device temporary
        self.waits = 0
        self.peer_copies = 0

    # the stream
    def _enqueue(self, fn: Any) -> None:
        self.queue.append(fn)

    def record(self, like: torch.Tensor) -> Event:
        return Event(len(self.queue))

    def wait(self, event: Event) -> None:
        self.waits += 1
        while self.ran < event.seq:
            self.queue[self.ran]()
            self.ran += 1

    def drain(self) -> None:
        self.wait(Event(len(self.queue)))

    # device work (runs at once: only copies across the bus are deferred)
    def take(self, pool: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        out = super().take(pool, index)
        self.device_blocks.append(int(out.shape[1]))
        return out

    def to_host(self, src: torch.Tensor, parts: Any) -> None:
        snapshot = src.clone()  # what the device holds when the copy runs
        for p, part in enumerate(parts):
            self._enqueue(lambda part=part, p=p: part.copy_(snapshot[p]))

    def to_device(self, parts: Any, like: torch.Tensor) -> torch.Tensor:
        seen = [part.clone() for part in parts]

        def check() -> None:  # the copy reads the host buffer now: it must be unchanged
            for part, was in zip(parts, seen):
                if not torch.equal(part, was):
                    raise AssertionError("a host buffer was rewritten before the copy "
                                         "reading it ran")
        self._enqueue(check)
        out = torch.stack(seen)
        self.device_blocks.append(int(out.shape[1]))
        return out

    def to_peer(self, src: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        self.peer_copies += 1
        return src.clone()

    def pinned(self, numel: int, like: torch.Tensor) -> torch.Tensor:
        self.pinned_sizes.append(numel)
        return torch.full((numel,), float("nan"), dtype=like.dtype)


def pool(num_blocks: int, seed: int | None = None) -> torch.Tensor:
    if seed is None:
        return torch.zeros((SHAPE[0], num_blocks, *SHAPE[1:]))
    return torch.from_numpy(np.random.default_rng(seed)
                            .standard_normal((SHAPE[0], num_blocks, *SHAPE[1:]))
                            .astype(np.float32))


def finish(jobs: list[Pending], ops: SimulatedGpu) -> None:
    for job in jobs:
        job.finish(ops)


SCATTERED = np.array([9, 2, 7, 0, 11, 4, 6, 1, 10], np.int64)


@pytest.mark.parametrize("chunk_blocks", [1, 2, 4, 100])
def test_swap_out_lands_only_after_its_events_and_bounds_every_temporary(chunk_blocks):
    ops = SimulatedGpu()
    src, dst = pool(9, seed=1), pool(12)
    src_ids = np.array([8, 0, 3, 5, 1, 7, 2, 6, 4], np.int64)
    transfer = Transfer(ops, chunk_blocks * BLOCK_BYTES)
    transfer.d2h(src, torch.from_numpy(src_ids), dst, SCATTERED)
    jobs = transfer.close()
    assert jobs, "the last chunk must still be in flight when the call returns"
    landed_early = dst[:, SCATTERED].ne(0).any(dim=tuple(range(2, 5))).sum().item()
    assert landed_early < len(SCATTERED)  # something is still deferred
    finish(jobs, ops)
    want = torch.zeros_like(dst)
    want[:, SCATTERED] = src[:, src_ids]
    assert torch.equal(dst, want)
    assert max(ops.device_blocks) <= chunk_blocks
    assert len(ops.pinned_sizes) <= 2
    assert all(n <= chunk_blocks * math.prod(SHAPE) for n in ops.pinned_sizes)


def test_swap_out_to_consecutive_blocks_copies_straight_into_the_pool():
    ops = SimulatedGpu()
    src, dst = pool(6, seed=2), pool(10)
    transfer = Transfer(ops, 2 * BLOCK_BYTES)
    transfer.d2h(src, torch.tensor([5, 4, 3, 2, 1, 0]), dst, np.arange(3, 9))
    jobs = transfer.close()
    assert ops.pinned_sizes == []  # no staging: the pinned pool is the DMA target
    assert not dst.any()  # nothing landed before the wait
    finish(jobs, ops)
    assert torch.equal(dst[:, 3:9], src[:, [5, 4, 3, 2, 1, 0]])
    assert not dst[:, :3].any() and not dst[:, 9:].any()


@pytest.mark.parametrize("chunk_blocks", [1, 3, 100])
@pytest.mark.parametrize("src_ids", [SCATTERED, np.arange(2, 11)], ids=["scattered", "run"])
def test_swap_in_never_rewrites_a_buffer_under_a_copy(chunk_blocks, src_ids):
    ops = SimulatedGpu()
    src, dst = pool(12, seed=3), pool(9)
    dst_ids = np.array([4, 0, 8, 2, 6, 1, 3, 5, 7], np.int64)
    transfer = Transfer(ops, chunk_blocks * BLOCK_BYTES)
    transfer.h2d(src, src_ids, dst, torch.from_numpy(dst_ids))
    assert transfer.last_event is not None
    jobs = transfer.close()
    finish(jobs, ops)
    ops.drain()
    want = torch.zeros_like(dst)
    want[:, dst_ids] = src[:, src_ids]
    assert torch.equal(dst, want)
    assert max(ops.device_blocks) <= chunk_blocks and len(ops.pinned_sizes) <= 2


def test_layers_share_the_two_staging_buffers():
    ops = SimulatedGpu()
    transfer = Transfer(ops, 2 * BLOCK_BYTES)
    srcs = [pool(9, seed=10 + i) for i in range(4)]
    dsts = [pool(12) for _ in range(4)]
    index = torch.arange(9)
    for s, d in zip(srcs, dsts):
        transfer.d2h(s, index, d, SCATTERED)
    finish(transfer.close(), ops)
    assert len(ops.pinned_sizes) == 2
    for s, d in zip(srcs, dsts):
        assert torch.equal(d[:, SCATTERED], s)


def test_device_to_device_moves_in_chunks_and_crosses_gpus_per_chunk():
    ops = SimulatedGpu()
    src, dst = pool(7, seed=4), pool(7)
    order = torch.tensor([6, 5, 4, 3, 2, 1, 0])
    transfer = Transfer(ops, 3 * BLOCK_BYTES)
    transfer.d2d(src, order, dst, torch.arange(7), peer=True)
    assert transfer.close() == []
    assert torch.equal(dst, src[:, order])
    assert ops.device_blocks == [3, 3, 1] and ops.peer_copies == 3


def test_a_failure_waits_for_queued_copies_and_lands_nothing():
    class Failing(SimulatedGpu):
        def take(self, pool, index):
            if len(self.device_blocks) == 2:
                raise MemoryError("out of device memory")
            return super().take(pool, index)

    ops = Failing()
    src, dst = pool(9, seed=5), pool(12)
    before = src.clone()
    transfer = Transfer(ops, 2 * BLOCK_BYTES)
    with pytest.raises(MemoryError):
        try:
            transfer.d2h(src, torch.arange(9), dst, SCATTERED)
        except MemoryError:
            transfer.abort()
            raise
    assert ops.ran == len(ops.queue)  # every queued copy ran before buffers are let go
    assert torch.equal(src, before)
    assert transfer.close() == []


# --- the checks have teeth ----------------------------------------------------------------


def test_landing_without_waiting_is_caught_as_wrong_data():
    class Hasty(Pending):
        def finish(self, ops):  # lands before the copy ran
            if self.land is not None:
                self.land()

    ops = SimulatedGpu()
    src, dst = pool(9, seed=6), pool(12)
    transfer = Transfer(ops, 2 * BLOCK_BYTES)
    transfer.d2h(src, torch.arange(9), dst, SCATTERED)
    for job in transfer.close():
        Hasty(job.event, job.land, job.keep).finish(ops)
    assert not torch.equal(dst[:, SCATTERED], src)


def test_reusing_a_staging_buffer_without_waiting_is_caught():
    class Reckless(Transfer):
        def _stage(self, numel, like):
            stage = self._stages[self._turn]
            self._turn ^= 1
            stage.job = None  # forgets to wait for the copy still reading it
            if stage.buffer is None:
                stage.buffer = self.ops.pinned(numel, like)
            return stage

    ops = SimulatedGpu()
    transfer = Reckless(ops, 2 * BLOCK_BYTES)
    transfer.h2d(pool(12, seed=7), SCATTERED, pool(9), torch.arange(9))
    with pytest.raises(AssertionError, match="rewritten before the copy"):
        ops.drain()


# --- planning -----------------------------------------------------------------------------


def test_chunks_hold_whole_blocks_and_at_least_one():
    transfer = Transfer(SimulatedGpu(), 1)
    assert transfer.blocks_per_chunk(pool(3)) == 1
    assert Transfer(SimulatedGpu(), 5 * BLOCK_BYTES - 1).blocks_per_chunk(pool(3)) == 4
    with pytest.raises(ValueError, match="chunk_bytes"):
        Transfer(SimulatedGpu(), 0)


def test_chunk_size_from_the_environment(monkeypatch):
    monkeypatch.delenv(ENV_CHUNK_BYTES, raising=False)
    assert chunk_bytes_from_env() == DEFAULT_CHUNK_BYTES
    monkeypatch.setenv(ENV_CHUNK_BYTES, "4096")
    assert chunk_bytes_from_env() == 4096
    for bad in ("lots", "0", "-3"):
        monkeypatch.setenv(ENV_CHUNK_BYTES, bad)
        with pytest.raises(ValueError, match=ENV_CHUNK_BYTES):
            chunk_bytes_from_env()


def test_consecutive_start():
    assert consecutive_start(np.array([4, 5, 6])) == 4
    assert consecutive_start(np.array([7])) == 7
    assert consecutive_start(np.array([4, 6])) is None
    assert consecutive_start(np.array([5, 4])) is None
    assert consecutive_start(np.array([], np.int64)) is None
