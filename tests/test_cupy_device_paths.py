"""The cupy backend's device paths on a machine without a GPU: the kernel probe, the
second-distribution check, typed DLPack errors, non-blocking index staging, stream
order, exact pinned pools and the swap engine over cupy's host-side operations.
CUDA entry points are replaced by recorders; ``tests/test_gpu_cupy.py`` runs the same
paths on a GPU.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest

cupy = pytest.importorskip("cupy", reason="the cupy plugin's tests need cupy importable "
                                          "(make setup installs it; no GPU needed)")
from kv_cupy import _backend as cupy_backend  # noqa: E402
from kv_cupy import _cuda, _dists  # noqa: E402
from kv_cupy._array_ops import CupyOps  # noqa: E402
from kv_cupy._backend import CupyBackend  # noqa: E402

from kvcore import Device, DType, TensorRef  # noqa: E402
from kvcore._staging import Transfer  # noqa: E402
from kvcore.errors import (BackendUnavailableError, DeviceMismatchError,  # noqa: E402
                           DtypeMismatchError, UnsupportedError)

CUDA0, CUDA1, CPU = Device("cuda", 0), Device("cuda", 1), Device("cpu")


@pytest.fixture(autouse=True)
def _fresh_kernel_cache():
    cupy_backend.kernel_problem.cache_clear()
    yield
    cupy_backend.kernel_problem.cache_clear()


# --- item 1: the probe runs a real kernel, and refuses two CuPy builds -------------------------


def test_probe_reports_why_a_kernel_cannot_run(monkeypatch):
    monkeypatch.setattr(cupy_backend, "_device_count", lambda: 2)
    monkeypatch.setattr(_dists, "cupy_distributions", lambda: [("cupy-cuda12x", "14.2.0")])

    def no_nvrtc(index: int) -> None:
        raise RuntimeError("CuPy failed to load libnvrtc.so.12: OSError: cannot open "
                           "shared object file")

    monkeypatch.setattr(_cuda, "probe_kernels", no_nvrtc)
    with pytest.raises(BackendUnavailableError) as info:
        CupyBackend.probe()
    text = str(info.value)
    assert "indexing kernel on cuda:0: RuntimeError: CuPy failed to load libnvrtc.so.12" in text
    assert "[ctk]" in text and 'pip install "kvcore-cupy[cuda12]"' in text
    with pytest.raises(UnsupportedError, match=r"cuda:1: cupy cannot run an indexing kernel"):
        CupyBackend().check_device(CUDA1)


def test_probe_passes_once_the_kernels_ran_and_checks_each_device_once(monkeypatch):
    ran: list[int] = []
    monkeypatch.setattr(cupy_backend, "_device_count", lambda: 2)
    monkeypatch.setattr(_dists, "cupy_distributions", lambda: [("cupy-cuda12x", "14.2.0")])
    monkeypatch.setattr(_cuda, "probe_kernels", ran.append)
    CupyBackend.probe()
    be = CupyBackend()
    be.check_device(CUDA1)
    be.check_device(CUDA1)
    assert ran == [0, 1]


def test_the_probe_kernel_runs_on_the_device():
    try:
        runtime_ok = cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - no driver: the usual case on CI
        runtime_ok = False
    if runtime_ok:  # a GPU: two kernels compile, run and give the right rows
        assert _cuda.probe_kernels(0) is None
        return
    # No usable driver: the kernel probe fails at its first CUDA call, with the
    # runtime's own error.
    with pytest.raises(Exception) as info:  # noqa: PT011 - whatever the runtime raises
        _cuda.probe_kernels(0)
    assert "cuda" in str(info.value).lower()


class Dist:
    def __init__(self, name: str, version: str) -> None:
        self.metadata = {"Name": name}
        self.version = version


def test_two_cupy_builds_side_by_side_are_named_with_the_fix(monkeypatch):
    dists = [Dist("numpy", "2.2.0"), Dist("cupy-cuda12x", "14.2.0"),
             Dist("cupy_cuda13x", "14.2.0"), Dist("cupy-wheel", "14.2.0")]
    monkeypatch.setattr(_dists.metadata, "distributions", lambda: dists)
    problem = _dists.duplicate_problem()
    assert problem is not None
    assert "cupy-cuda12x 14.2.0, cupy-cuda13x 14.2.0" in problem
    assert "pip uninstall -y cupy-cuda12x cupy-cuda13x" in problem
    monkeypatch.setattr(cupy_backend, "_device_count",
                        lambda: pytest.fail("the runtime was asked before the check"))
    with pytest.raises(BackendUnavailableError, match="several CuPy distributions"):
        CupyBackend.probe()
    monkeypatch.setattr(_dists.metadata, "distributions", lambda: dists[:2])
    assert _dists.duplicate_problem() is None


def test_a_broken_cupy_import_with_two_builds_says_so():
    code = textwrap.dedent("""
        import importlib.metadata as md, sys
        class D:
            def __init__(self, name):
                self.metadata, self.version = {"Name": name}, "14.2.0"
        md.distributions = lambda: [D("cupy-cuda12x"), D("cupy-cuda13x")]
        sys.modules["cupy"] = None  # the import breaks, as mixed files can make it
        try:
            import kv_cupy._backend
        except ImportError as exc:
            print(exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert "several CuPy distributions are installed side by side" in out


# --- item 4: typed errors from DLPack imports -------------------------------------------------


class Producer:
    def __init__(self, dtype: str = "torch.float16", requires_grad: bool = False,
                 raises: BaseException | None = None) -> None:
        self.dtype = dtype
        self.requires_grad = requires_grad
        self.raises = raises

    def __dlpack_device__(self) -> tuple[int, int]:
        return (2, 0)

    def __dlpack__(self, **kwargs: Any) -> Any:
        raise AssertionError("cupy.from_dlpack is mocked")


@pytest.fixture
def fake_import(monkeypatch):
    """``cupy.from_dlpack`` raising what the producer says; devices are no-ops."""
    monkeypatch.setattr(cupy.cuda, "Device", lambda index: contextlib.nullcontext())

    def from_dlpack(obj: Producer) -> Any:
        raise obj.raises  # type: ignore[misc]

    monkeypatch.setattr(cupy, "from_dlpack", from_dlpack)


def test_bfloat16_producer_is_a_dtype_error(fake_import):
    bf16 = Producer("torch.bfloat16", raises=NotImplementedError(
        "CuPy does not support bfloat16. Please install ml_dtypes to use bfloat16."))
    with pytest.raises(DtypeMismatchError, match=r"Producer array has dtype torch.bfloat16"):
        CupyBackend().asarray(bf16, CUDA0)


def test_tensor_requiring_grad_is_a_type_error_naming_detach(fake_import):
    with pytest.raises(TypeError, match=r"requires grad; call .detach\(\) first"):
        CupyBackend().asarray(Producer(requires_grad=True), CUDA0)


@pytest.mark.parametrize("raised", [BufferError("Can't export tensors with the conjugate bit"),
                                    ValueError("bad stream"), TypeError("uint7 is not supported")])
def test_other_import_failures_are_type_errors_with_the_reason(fake_import, raised):
    with pytest.raises(TypeError, match=f"through DLPack: {type(raised).__name__}"):
        CupyBackend().asarray(Producer(raises=raised), CUDA0)


def test_tensor_refs_holding_host_arrays_are_refused_naming_the_device():
    be = CupyBackend()
    native = np.zeros((1, 2, 3), np.float16)
    ref = TensorRef(native, (1, 2, 3), "float16", "cpu")
    # A ref holding a host array is handled like the array itself (refused for a GPU
    # cache, naming both devices), never exported through DLPack.
    with pytest.raises(DeviceMismatchError, match="is on cpu, the cache is on cuda:0"):
        be.asarray(ref, CUDA0)


# --- item 2 and 3: staging without blocking, on the pool's device ------------------------------


class DeviceRecorder:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.current = 0
        self.calls: list[tuple[str, int, dict[str, Any]]] = []
        recorder = self

        @contextlib.contextmanager
        def device(index: int):
            before, recorder.current = recorder.current, index
            try:
                yield
            finally:
                recorder.current = before

        def asarray(host: Any, **kwargs: Any) -> np.ndarray:
            recorder.calls.append(("asarray", recorder.current, kwargs))
            return np.array(host)

        monkeypatch.setattr(cupy.cuda, "Device", device)
        monkeypatch.setattr(cupy, "asarray", asarray)
        monkeypatch.setattr(cupy.cuda, "get_current_stream", lambda: FakeStream(1))


def test_cuda_index_is_copied_without_blocking_on_its_device(monkeypatch):
    rec = DeviceRecorder(monkeypatch)
    index = CupyBackend().index_array(np.array([5, 1]), CUDA1)
    assert index.tolist() == [5, 1]
    assert rec.calls == [("asarray", 1, {"blocking": False})] and rec.current == 0


def test_attention_inputs_are_staged_on_the_pools_device_without_blocking(monkeypatch):
    rec = DeviceRecorder(monkeypatch)

    class Like:
        class device:  # noqa: N801 - stands in for cupy.cuda.Device(1)
            id = 1

            def __enter__(self):
                rec.current = 1

            def __exit__(self, *exc):
                rec.current = 0

        device = device()

    ops = CupyOps(cupy)
    ops.from_host(np.array([1, 2]), Like())
    assert rec.calls == [("asarray", 1, {"blocking": False})]
    assert ops.device_scope(Like()) is Like.device


# --- item 7: stream order (fake streams and events) -------------------------------------------


class FakeEvent:
    def __init__(self) -> None:
        self.waited = 0

    def synchronize(self) -> None:
        self.waited += 1


class FakeStream:
    def __init__(self, ptr: int) -> None:
        self.ptr = ptr
        self.recorded: list[FakeEvent] = []
        self.waited: list[FakeEvent] = []

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FakeStream) and other.ptr == self.ptr

    __hash__ = None  # type: ignore[assignment]

    def record(self) -> FakeEvent:
        event = FakeEvent()
        self.recorded.append(event)
        return event

    def wait_event(self, event: FakeEvent) -> None:
        self.waited.append(event)


class Pool:
    class device:  # noqa: N801
        id = 0


def test_stream_order_waits_on_the_gpu_and_synchronize_waits_on_events(monkeypatch):
    streams = {"now": FakeStream(1)}
    monkeypatch.setattr(cupy.cuda, "get_current_stream", lambda: streams["now"])
    monkeypatch.setattr(cupy.cuda, "Device", lambda index: contextlib.nullcontext())
    order = _cuda.StreamOrder()
    pool, index = Pool(), Pool()
    order.made(index)
    a = order.begin(pool, index)
    order.end(pool, a)
    assert a.waited == []
    streams["now"] = FakeStream(2)
    b = order.begin(pool, index)
    assert len(b.waited) == 2 and len(a.recorded) == 2  # the pool's op and the index copy
    done = FakeEvent()
    order.end(pool, b, done)
    streams["now"] = FakeStream(3)
    c = order.begin(pool)
    assert c.waited == [done]
    order.synchronize(0)
    assert done.waited == 1  # B's last op was the transfer: its own event
    assert [e.waited for e in a.recorded] == [0, 0, 1]  # A: an event recorded at the call
    key = id(pool)
    del pool
    assert key not in order._pools._data  # the table forgets dead pools


# --- items 5 and 8: pinned swap pools, swaps through pinned memory ----------------------------


def test_pinned_swap_pool_is_exactly_its_size_and_zeroed(monkeypatch):
    allocations: list[tuple[int, int]] = []

    class FakePinned:
        def __init__(self, size: int, flags: int = 0) -> None:
            allocations.append((size, flags))
            self.buffer = bytearray(b"\xff" * size)  # not cleared, like cudaHostAlloc

    monkeypatch.setattr(cupy.cuda, "PinnedMemory", FakePinned)
    monkeypatch.setattr(cupy.cuda, "PinnedMemoryPointer", lambda mem, offset: mem.buffer)
    pool = CupyBackend().allocate_layer(5, 4, 2, 3, DType.float16, CPU, pinned=True, planes=3)
    assert pool.shape == (3, 5, 4, 2, 3) and pool.dtype == np.float16 and not pool.any()
    assert allocations == [(720, 1)]  # 720 bytes, portable; CuPy's pool would take 1024


class SimulatedCupy(_cuda.CupyStagingOps):
    """cupy's real host-side staging ops; the device is numpy with deferred copies."""

    def __init__(self) -> None:
        self.queue: list[Any] = []
        self.ran = 0

    def take(self, pool, index):
        return np.take(pool, index, axis=1)

    def put(self, pool, index, values):
        pool[:, index] = values

    def to_host(self, src, parts):
        snapshot = src.copy()
        for p, part in enumerate(parts):
            self.queue.append(lambda part=part, p=p: part.__setitem__(..., snapshot[p]))

    def to_device(self, parts, like):
        return np.stack([part.copy() for part in parts])

    def record(self, like):
        return len(self.queue)

    def wait(self, event):
        while self.ran < event:
            self.queue[self.ran]()
            self.ran += 1

    def pinned(self, numel, like):
        return np.full(numel, np.nan, like.dtype)


def test_swap_round_trip_through_cupys_host_operations():
    ops = SimulatedCupy()
    rng = np.random.default_rng(3)
    gpu = rng.standard_normal((2, 7, 4, 2, 3)).astype(np.float16)
    host = np.zeros((2, 12, 4, 2, 3), np.float16)
    ids = np.array([11, 3, 5, 0, 9, 4, 1])
    transfer = Transfer(ops, 2 * gpu[:, :1].nbytes)
    transfer.d2h(gpu, np.arange(7), host, ids)
    jobs = transfer.close()
    assert not np.array_equal(host[:, ids], gpu)  # still in flight
    for job in jobs:
        job.finish(ops)
    assert np.array_equal(host[:, ids].view(np.uint16), gpu.view(np.uint16))
    back = np.zeros_like(gpu)
    transfer = Transfer(ops, 3 * gpu[:, :1].nbytes)
    transfer.h2d(host, ids, back, np.arange(7)[::-1].copy())
    for job in transfer.close():
        job.finish(ops)
    assert np.array_equal(back, gpu[:, ::-1])
