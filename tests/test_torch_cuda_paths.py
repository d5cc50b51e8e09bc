"""The torch backend's CUDA paths, exercised on the CPU with torch's CUDA entry points
replaced by recorders: which calls are made (pinned staging, ``non_blocking``, stream
waits, events, ``cudaHostRegister``), not what a GPU does with them.  The same paths run
for real in ``tests/test_gpu_torch.py`` on a machine with a GPU.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import pytest
import torch
from kv_torch import _backend as backend_module
from kv_torch import _cuda
from kv_torch._backend import TorchBackend

import kvcore
from kvcore import Device, DType, TensorRef
from kvcore._staging import Pending
from kvcore.errors import PoolAllocationError
from tests.test_staging import SimulatedGpu

CUDA0, CUDA1, CPU = Device("cuda", 0), Device("cuda", 1), Device("cpu")


class Recorder:
    """Replaces ``torch.empty`` and ``Tensor.to`` to log pinned allocations and copies."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pinned = 0
        self.copies: list[tuple[str, bool]] = []
        real_empty, real_to = torch.empty, torch.Tensor.to
        recorder = self

        def empty(*args: Any, pin_memory: bool = False, **kwargs: Any) -> torch.Tensor:
            recorder.pinned += bool(pin_memory)
            return real_empty(*args, **kwargs)

        def to(self: torch.Tensor, *args: Any, non_blocking: bool = False, **kwargs: Any):
            target = args[0] if args else kwargs.get("device")
            if isinstance(target, torch.device) and target.type == "cuda":
                recorder.copies.append((str(target), non_blocking))
                return self.clone()  # stands in for the device copy
            return real_to(self, *args, non_blocking=non_blocking, **kwargs)

        monkeypatch.setattr(torch, "empty", empty)
        monkeypatch.setattr(torch.Tensor, "to", to)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream("s0"))


class FakeEvent:
    def __init__(self, stream: FakeStream) -> None:
        self.stream = stream
        self.waited = 0

    def synchronize(self) -> None:
        self.waited += 1


class FakeStream:
    def __init__(self, name: str) -> None:
        self.name = name
        self.cuda_stream = hash(name)
        self.waited_streams: list[str] = []
        self.waited_events: list[FakeEvent] = []
        self.recorded: list[FakeEvent] = []

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FakeStream) and other.name == self.name

    __hash__ = None  # type: ignore[assignment]  # like torch's: compared, not hashed

    def wait_stream(self, other: FakeStream) -> None:
        self.waited_streams.append(other.name)

    def wait_event(self, event: FakeEvent) -> None:
        self.waited_events.append(event)

    def record_event(self) -> FakeEvent:
        event = FakeEvent(self)
        self.recorded.append(event)
        return event


class FakeIndex:
    is_cuda = True

    def __init__(self) -> None:
        self.used_on: list[str] = []

    def record_stream(self, stream: FakeStream) -> None:
        self.used_on.append(stream.name)


@pytest.fixture
def be() -> TorchBackend:
    backend = kvcore.get_backend("torch")
    assert isinstance(backend, TorchBackend)
    return backend


# --- item 2: indices reach the GPU without blocking the host ----------------------------------


def test_cuda_index_is_staged_through_pinned_memory_without_blocking(be, monkeypatch):
    rec = Recorder(monkeypatch)
    slots = np.array([7, 3, 12], np.int64)
    index = be.index_array(slots, CUDA1)
    assert rec.pinned == 1 and rec.copies == [("cuda:1", True)]
    assert index.tolist() == [7, 3, 12]
    slots[0] = 99  # the index owns its host copy
    assert getattr(index, backend_module._HOST_ATTR)[0].tolist() == [7, 3, 12]
    assert getattr(index, _cuda._MADE_ON)[0] == FakeStream("s0")


def test_whole_block_plan_stages_its_block_ids_without_blocking(monkeypatch):
    rec = Recorder(monkeypatch)
    slots = torch.arange(16).reshape(2, 8).flip(0).reshape(-1)  # blocks 2, 3, 0, 1 of 4
    setattr(slots, backend_module._HOST_ATTR, (slots.numpy().copy(), slots._version))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda", 0)))
    plan = backend_module._gather_plan(slots, 4)
    monkeypatch.undo()
    assert plan is not None and plan[1].tolist() == [2, 3, 0, 1]
    assert rec.pinned == 1 and rec.copies == [("cuda:0", True)]


def test_torch_ops_stage_attention_inputs_without_blocking(monkeypatch):
    from kv_torch._array_ops import TorchOps

    rec = Recorder(monkeypatch)

    class Like:
        device = torch.device("cuda", 1)
        is_cuda = True

    out = TorchOps(torch).from_host(np.array([[True, False]]), Like())
    assert out.tolist() == [[True, False]]
    assert rec.pinned == 1 and rec.copies == [("cuda:1", True)]


def test_cpu_index_never_touches_cuda(be, monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: pytest.fail("CUDA used"))
    index = be.index_array(np.array([1, 2]), CPU)
    assert index.device.type == "cpu" and not hasattr(index, _cuda._MADE_ON)


# --- item 7: stream order per pool ----------------------------------------------------------


def test_pool_operations_on_another_stream_wait_for_the_last_one_on_the_gpu(monkeypatch):
    streams = {"now": FakeStream("A")}
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: streams["now"])
    order = _cuda.StreamOrder()
    pool = torch.zeros(2, 3)
    index = FakeIndex()
    setattr(index, _cuda._MADE_ON, [FakeStream("A"), set()])

    a = order.begin(pool, index)
    order.end(pool, a)
    assert a.waited_streams == [] and index.used_on == []  # same stream: nothing to do

    streams["now"] = FakeStream("B")
    b = order.begin(pool, index)
    order.end(pool, b)
    assert b.waited_streams == ["A", "A"]  # the pool's last op and the index's copy
    assert index.used_on == ["B"]  # the caching allocator learns the second stream
    order.begin(pool, index)
    assert b.waited_streams == ["A", "A"] and index.used_on == ["B"]  # already ordered

    transfer_done = FakeEvent(b)
    order.end(pool, b, transfer_done)
    streams["now"] = FakeStream("C")
    c = order.begin(pool)
    assert c.waited_events == [transfer_done] and c.waited_streams == []


def test_synchronize_waits_on_the_transfers_event_not_the_device(be, monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize",
                        lambda *a: pytest.fail("the whole device was synchronized"))
    monkeypatch.setattr(backend_module, "cuda_problem", lambda: None)
    order = _cuda.StreamOrder()
    monkeypatch.setattr(be, "_order", order)

    class Pool:  # a stand-in CUDA pool: attributes settable, on cuda:0
        device = torch.device("cuda", 0)

    a, b = FakeStream("A"), FakeStream("B")
    copy_done = FakeEvent(a)
    order.end(Pool(), b)  # a write on B
    order.end(Pool(), a, copy_done)  # a swap-in on A, its own event
    be.synchronize(CUDA0)
    assert copy_done.waited == 1 and a.recorded == []
    assert len(b.recorded) == 1 and b.recorded[0].waited == 1  # B: up to the call
    be.synchronize(CUDA0)  # nothing new since: nothing to wait for
    assert copy_done.waited == 1 and len(b.recorded) == 1
    be.synchronize(CUDA1)


# --- items 6 and 8: the backend's transfer glue ----------------------------------------------


class NoOrder:
    def begin(self, pool: Any, *indices: Any) -> str:
        return "stream"

    def end(self, pool: Any, stream: Any, event: Any = None) -> None:
        self.last_event = event


def test_swap_out_is_deferred_until_synchronize_and_bounded(be, monkeypatch):
    ops = SimulatedGpu()
    monkeypatch.setattr(be, "_staging_ops", ops)
    monkeypatch.setattr(be, "_order", NoOrder())
    monkeypatch.setattr(be, "transfer_chunk_bytes", 2 * 2 * 4 * 2 * 3 * 4)  # two blocks
    rng = np.random.default_rng(0)
    srcs = [torch.from_numpy(rng.standard_normal((2, 6, 4, 2, 3)).astype(np.float32))
            for _ in range(3)]
    dsts = [be.allocate_layer(8, 4, 2, 3, DType.float32, CPU) for _ in range(3)]
    ids = np.array([7, 1, 4, 0, 6, 2])
    out = be._transfer_cuda(srcs, torch.arange(6), dsts, torch.from_numpy(ids))
    assert out == dsts and be._pending  # in flight when the call returns
    be.synchronize(CPU)
    assert not be._pending
    for s, d in zip(srcs, dsts):
        assert torch.equal(d[:, ids], s)
    assert max(ops.device_blocks) <= 2 and len(ops.pinned_sizes) == 2


def test_out_of_memory_mid_swap_is_typed_and_leaves_nothing_in_flight(be, monkeypatch):
    class Oom(SimulatedGpu):
        def take(self, pool, index):
            if len(self.device_blocks) == 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
            return super().take(pool, index)

    ops = Oom()
    monkeypatch.setattr(be, "_staging_ops", ops)
    monkeypatch.setattr(be, "_order", NoOrder())
    monkeypatch.setattr(be, "transfer_chunk_bytes", 1)
    src = torch.ones(2, 4, 4, 2, 3)
    dst = be.allocate_layer(8, 4, 2, 3, DType.float32, CPU)
    with pytest.raises(PoolAllocationError, match=r"out of memory moving 4 blocks.*partial"):
        be._transfer_cuda([src], torch.arange(4), [dst], torch.tensor([6, 0, 3, 1]))
    assert not be._pending and ops.ran == len(ops.queue)
    assert torch.equal(src, torch.ones(2, 4, 4, 2, 3))


def test_pending_jobs_finish_in_order_before_any_operation(be):
    log: list[str] = []

    class Ev:
        def __init__(self, name: str) -> None:
            self.name = name

        def synchronize(self) -> None:
            log.append(f"wait {self.name}")

    be._pending.extend([Pending(Ev("a"), land=lambda: log.append("land a")),
                        Pending(Ev("b"))])
    pool = be.allocate_layer(2, 4, 2, 3, DType.float32, CPU)
    be.copy_blocks(pool, be.index_array(np.array([0]), CPU), be.index_array(np.array([1]), CPU))
    assert log == ["wait a", "land a", "wait b"] and not be._pending


# --- item 8: pinned swap pools of exactly the asked size --------------------------------------


class FakeCudart:
    class cudaError:  # noqa: N801 - torch's spelling
        success = 0

    def __init__(self, status: int = 0) -> None:
        self.status = status
        self.registered: list[tuple[int, int, int]] = []
        self.unregistered: list[int] = []

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> int:  # noqa: N802
        self.registered.append((ptr, size, flags))
        return self.status

    def cudaHostUnregister(self, ptr: int) -> int:  # noqa: N802
        self.unregistered.append(ptr)
        return 0

    def cudaGetErrorString(self, status: int) -> str:  # noqa: N802
        return "out of memory"


def test_pinned_swap_pool_locks_exactly_its_bytes_and_unlocks_on_release(be, monkeypatch):
    cudart = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    monkeypatch.setattr(backend_module, "cuda_problem", lambda: None)
    # 3 * 5 * 4 * 2 * 3 float16 = 720 bytes: torch's pinned allocator would take 1024.
    pool = be.allocate_layer(5, 4, 2, 3, DType.float16, CPU, pinned=True, planes=3)
    assert pool.shape == (3, 5, 4, 2, 3) and pool.dtype == torch.float16
    assert not pool.any()
    assert cudart.registered == [(pool.data_ptr(), 720, 1)]
    pool[2, 4] = 1.5  # writable host memory
    be.release_layer(pool)
    be.release_layer(pool)  # idempotent
    assert cudart.unregistered == [pool.data_ptr()]


def test_pinned_swap_pool_that_cannot_be_locked_is_a_typed_error(be, monkeypatch):
    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart(status=2))
    monkeypatch.setattr(backend_module, "cuda_problem", lambda: None)
    with pytest.raises(PoolAllocationError, match=r"page-lock 720 bytes.*out of memory"):
        be.allocate_layer(5, 4, 2, 3, DType.float16, CPU, pinned=True, planes=3)


def test_without_cuda_a_pinned_request_gives_plain_memory(be, monkeypatch):
    monkeypatch.setattr(torch.cuda, "cudart", lambda: pytest.fail("registered"))
    monkeypatch.setattr(backend_module, "cuda_problem", lambda: "no driver")
    pool = be.allocate_layer(2, 4, 2, 3, DType.float32, CPU, pinned=True)
    assert not pool.any()
    be.release_layer(pool)


# --- item 3: a producer on another GPU is imported under its device ----------------------------


def test_dlpack_producer_on_cuda1_is_imported_with_cuda1_current(be, monkeypatch):
    current = {"device": 0}
    seen: list[int] = []

    @contextlib.contextmanager
    def device(index: int):
        before, current["device"] = current["device"], index
        try:
            yield
        finally:
            current["device"] = before

    def from_dlpack(obj: Any) -> torch.Tensor:
        seen.append(current["device"])
        return torch.zeros(1, 2, 3)

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch, "from_dlpack", from_dlpack)

    class OnCuda1:
        def __dlpack_device__(self) -> tuple[int, int]:
            return (2, 1)

        def __dlpack__(self, **kwargs: Any) -> Any:
            raise AssertionError("torch.from_dlpack is mocked")

    be.asarray(OnCuda1(), CUDA1)
    assert seen == [1] and current["device"] == 0


def test_tensor_refs_holding_tensors_pass_through_without_dlpack(be):
    t = torch.zeros(2, 2, 3)
    ref = TensorRef(t, (2, 2, 3), "float32", "cpu")
    assert be.asarray(ref, CPU) is t
