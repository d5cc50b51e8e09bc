"""The torch backend: every operation against a numpy reference, in all three dtypes,
the manager end to end, CUDA device checks, and torch.compile on the read path.

CUDA tests are marked ``gpu`` and skip with torch's own reason where CUDA is unusable.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch  # CI installs torch: a missing torch must fail here, not skip
from kv_torch import TorchBackend, TorchKvCacheHandle
from kv_torch._backend import cuda_problem

import kvcore
from kvcore import AllocationRequest, CacheConfig, Device, DType, KvCacheManager
from kvcore._staging import Pending
from kvcore.errors import (
    DeviceMismatchError,
    DtypeMismatchError,
    HandleSwappedError,
    ShapeMismatchError,
    UnsupportedError,
)

CPU = Device("cpu")
DTYPES = [DType.float16, DType.bfloat16, DType.float32]
TORCH = {DType.float16: torch.float16, DType.bfloat16: torch.bfloat16,
         DType.float32: torch.float32}
SHAPE = {"num_blocks": 6, "block_size": 4, "num_kv_heads": 2, "head_dim": 3}
CUDA_REASON = cuda_problem()
needs_cuda = pytest.mark.skipif(CUDA_REASON is not None,
                                reason=f"torch cannot use CUDA here: {CUDA_REASON}")


@pytest.fixture(scope="module")
def be() -> TorchBackend:
    backend = kvcore.get_backend("torch")
    assert isinstance(backend, TorchBackend)
    return backend


def values(rng: np.random.Generator, shape: tuple[int, ...], dtype: DType) -> np.ndarray:
    """float32 values exactly representable in ``dtype``, so comparisons can be exact."""
    raw = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    return raw.to(TORCH[dtype]).float().numpy()


def tensor(array: np.ndarray, dtype: DType, device: str = "cpu") -> torch.Tensor:
    return torch.from_numpy(array).to(device=device, dtype=TORCH[dtype])


def host(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns, so equality means bit-identical (NaN and -0.0 included)."""
    return t.detach().cpu().view(torch.int32 if t.dtype == torch.float32 else torch.int16)


# --- selection and capabilities ---------------------------------------------------------


def test_backend_is_listed_available_and_selected(be: TorchBackend) -> None:
    records = {r.name: r for r in kvcore.list_backends(probe=True)}
    assert records["torch"].available, records["torch"].reason
    assert records["torch"].distribution == "kvcore-torch"
    assert be.handle_class is TorchKvCacheHandle
    caps = be.capabilities()
    assert caps.dtypes == (*DTYPES, DType.uint8, DType.int8)
    assert caps.codecs == (DType.float8_e4m3, DType.float8_e5m2, DType.int8)
    assert "cpu" in caps.device_types and "cpu" in caps.swap_device_types
    assert ("cuda" in caps.device_types) == (CUDA_REASON is None)
    assert caps.pinned_memory == (CUDA_REASON is None)


def test_cuda_refused_with_torchs_reason_when_unusable(be: TorchBackend) -> None:
    if CUDA_REASON is None:
        count = torch.cuda.device_count()
        with pytest.raises(UnsupportedError, match=f"cuda:{count}.*sees {count} CUDA"):
            be.check_device(Device("cuda", count))
        return
    with pytest.raises(UnsupportedError) as info:
        be.check_device(Device("cuda", 0))
    assert "cuda:0" in str(info.value) and CUDA_REASON in str(info.value)
    with pytest.raises(UnsupportedError, match="cuda:0"):
        KvCacheManager(CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, num_blocks=2,
                                   device="cuda:0"), backend="torch")


# --- every operation against numpy ------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_allocate_layer(be: TorchBackend, dtype: DType) -> None:
    layer = be.allocate_layer(**SHAPE, dtype=dtype, device=CPU)
    assert tuple(layer.shape) == (2, 6, 4, 2, 3) and layer.dtype == TORCH[dtype]
    assert layer.is_contiguous() and not layer.requires_grad
    assert be.describe(layer) == ((2, 6, 4, 2, 3), dtype, CPU)
    assert not bool(layer.any())
    # pinned is a request for a GPU pool's swap pool; without CUDA it is ignored.
    pinned = be.allocate_layer(**SHAPE, dtype=dtype, device=CPU, pinned=True)
    assert pinned.is_pinned() == (CUDA_REASON is None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scatter_and_gather_match_numpy(be: TorchBackend, dtype: DType) -> None:
    rng = np.random.default_rng(0)
    layer = be.allocate_layer(**SHAPE, dtype=dtype, device=CPU)
    ref = np.zeros((2, 24, 2, 3), np.float32)  # the flat [2, slots, H, D] view
    slots = np.array([5, 0, 23, 9, 10, 11, 17], np.int64)
    k, v = values(rng, (7, 2, 3), dtype), values(rng, (7, 2, 3), dtype)
    layer = be.scatter(layer, be.index_array(slots, CPU), (tensor(k, dtype), tensor(v, dtype)))
    ref[0, slots], ref[1, slots] = k, v
    np.testing.assert_array_equal(be.to_numpy(layer).reshape(2, 24, 2, 3), ref)
    order = np.array([23, 5, 9, 0, 11], np.int64)
    for kv in (0, 1):
        got = be.gather(layer, kv, be.index_array(order, CPU))
        assert got.dtype == TORCH[dtype] and tuple(got.shape) == (5, 2, 3)
        np.testing.assert_array_equal(be.to_numpy(got), ref[kv, order])
        got.fill_(7)  # a gather is a new tensor, never a view of the pool
    np.testing.assert_array_equal(be.to_numpy(layer).reshape(2, 24, 2, 3), ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_copy_blocks_matches_numpy_even_when_overlapping(be: TorchBackend, dtype: DType) -> None:
    rng = np.random.default_rng(1)
    ref = values(rng, (2, 6, 4, 2, 3), dtype)
    layer = be.from_numpy(ref, dtype, CPU)
    src, dst = np.array([0, 1, 4], np.int64), np.array([1, 2, 5], np.int64)  # 1 is both
    be.copy_blocks(layer, be.index_array(src, CPU), be.index_array(dst, CPU))
    ref[:, dst] = ref[:, src]  # numpy reads the right-hand side first
    np.testing.assert_array_equal(be.to_numpy(layer), ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_transfer_blocks_between_two_cpu_pools(be: TorchBackend, dtype: DType) -> None:
    rng = np.random.default_rng(2)
    src_ref = values(rng, (2, 6, 4, 2, 3), dtype)
    src_layer = be.from_numpy(src_ref, dtype, CPU)
    dst_layer = be.allocate_layer(num_blocks=3, block_size=4, num_kv_heads=2, head_dim=3,
                                  dtype=dtype, device=CPU)
    src, dst = np.array([5, 0, 3], np.int64), np.array([0, 2, 1], np.int64)
    be.transfer_blocks(src_layer, be.index_array(src, CPU), dst_layer, be.index_array(dst, CPU))
    be.synchronize(CPU)
    want = np.zeros((2, 3, 4, 2, 3), np.float32)
    want[:, dst] = src_ref[:, src]
    np.testing.assert_array_equal(be.to_numpy(dst_layer), want)
    np.testing.assert_array_equal(be.to_numpy(src_layer), src_ref)  # the source is untouched


def test_index_array_is_an_int64_copy(be: TorchBackend) -> None:
    ids = np.array([3, 1, 2])  # platform int, not int64
    index = be.index_array(ids, CPU)
    assert index.dtype == torch.int64 and index.device.type == "cpu"
    ids[0] = 99
    assert index.tolist() == [3, 1, 2]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_from_numpy_and_to_numpy(be: TorchBackend, dtype: DType) -> None:
    src = values(np.random.default_rng(3), (4, 2, 3), dtype)
    t = be.from_numpy(src, dtype, CPU)
    assert t.dtype == TORCH[dtype]
    src[0] = 1000.0
    assert float(t[0, 0, 0]) != 1000.0  # from_numpy copies
    back = be.to_numpy(t)
    # numpy has no bfloat16: it is widened, exactly, to float32.
    assert back.dtype == (np.float32 if dtype is DType.bfloat16 else np.dtype(dtype.value))
    np.testing.assert_array_equal(back.astype(np.float32), host(t))
    back[...] = 0
    assert bool(t.any())  # to_numpy copies too


def test_dtype_and_device_are_refused_with_names(be: TorchBackend) -> None:
    with pytest.raises(DeviceMismatchError, match=r"meta.*cpu"):
        be.asarray(torch.zeros(2, device="meta"), CPU)
    with pytest.raises(TypeError, match="list"):
        be.asarray([1.0, 2.0], CPU)
    with pytest.raises(TypeError, match="torch.Tensor"):
        be.describe(np.zeros(2))


def test_asarray_passes_tensors_through_and_shares_numpy_memory(be: TorchBackend) -> None:
    t = torch.zeros(2, 2, 3, dtype=torch.float16)
    assert be.asarray(t, CPU) is t
    a = np.arange(12, dtype=np.float16).reshape(2, 2, 3)
    shared = be.asarray(a, CPU)
    assert shared.dtype == torch.float16 and shared.data_ptr() == a.ctypes.data
    # Never cast: a float64 array stays float64 (the manager then refuses it).
    assert be.asarray(a.astype(np.float64), CPU).dtype == torch.float64


def test_asarray_handles_readonly_strided_and_reversed_numpy(be: TorchBackend) -> None:
    a = np.arange(24, dtype=np.float32).reshape(4, 2, 3)
    ro = a.copy()
    ro.flags.writeable = False
    np.testing.assert_array_equal(be.asarray(ro, CPU).numpy(), ro)
    strided = a[::2]
    got = be.asarray(strided, CPU)
    np.testing.assert_array_equal(got.numpy(), strided)
    assert got.data_ptr() == strided.ctypes.data  # a strided view is still shared
    # Negative strides cannot cross DLPack into torch (it aborts the process), so
    # those arrays are copied once, with their dtype kept.
    rev = a[::-1]
    got = be.asarray(rev, CPU)
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), rev)


# --- deferred GPU -> host scatter (the bookkeeping runs on any machine) ------------------


class _DoneEvent:
    """Stands in for a ``torch.cuda.Event`` that has already completed."""

    def __init__(self) -> None:
        self.waited = False

    def synchronize(self) -> None:
        self.waited = True


@pytest.mark.parametrize("finish", ["synchronize", "gather", "to_numpy", "transfer"])
def test_pending_host_scatter_lands_before_any_use(be: TorchBackend, finish: str) -> None:
    dst_layer = be.allocate_layer(**SHAPE, dtype=DType.float32, device=CPU)
    staging = torch.arange(2 * 2 * 4 * 2 * 3, dtype=torch.float32).reshape(2, 2, 4, 2, 3)
    done = _DoneEvent()
    dst = be.index_array(np.array([4, 1]), CPU)
    be._pending.append(Pending(done, land=lambda: dst_layer.index_copy_(1, dst, staging)))
    if finish == "synchronize":
        be.synchronize(CPU)
    elif finish == "gather":
        be.gather(dst_layer, 0, be.index_array(np.array([0]), CPU))
    elif finish == "to_numpy":
        be.to_numpy(dst_layer)
    else:
        other = be.allocate_layer(**SHAPE, dtype=DType.float32, device=CPU)
        be.transfer_blocks(dst_layer, dst, other, dst)
    assert done.waited and not be._pending
    assert torch.equal(dst_layer[:, [4, 1]], staging)


# --- the manager end to end ----------------------------------------------------------------


def config(dtype: DType, **over: object) -> CacheConfig:
    fields: dict[str, object] = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 4,
                                 "dtype": dtype, "block_size": 4, "num_blocks": 16,
                                 "swap_blocks": 8, "swap_device": "cpu"}
    fields.update(over)
    return CacheConfig(**fields)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_manager_end_to_end(dtype: DType) -> None:
    rng = np.random.default_rng(4)
    mgr = KvCacheManager(config(dtype), backend="torch")
    a = mgr.allocate(AllocationRequest(request_id="a", num_tokens=6))
    assert isinstance(a, TorchKvCacheHandle)
    assert a.as_any(TorchKvCacheHandle) is a
    dense = {layer: [values(rng, (6, 2, 4), dtype), values(rng, (6, 2, 4), dtype)]
             for layer in range(2)}
    for layer, (k, v) in dense.items():
        a.write(layer, tensor(k, dtype), tensor(v, dtype))

    # decode steps for a batch: one write_slots per layer
    b = mgr.allocate(AllocationRequest(request_id="b", num_tokens=3))
    dense_b = {layer: [values(rng, (3, 2, 4), dtype), values(rng, (3, 2, 4), dtype)]
               for layer in range(2)}
    for layer, (k, v) in dense_b.items():
        mgr.write(b, layer, tensor(k, dtype), tensor(v, dtype))
    for _ in range(3):
        slots = mgr.extend_batch([a, b], 1)
        for layer in range(2):
            new = [values(rng, (2, 2, 4), dtype) for _ in range(2)]
            mgr.write_slots(layer, slots, tensor(new[0], dtype), tensor(new[1], dtype))
            for kv in (0, 1):
                dense[layer][kv] = np.concatenate([dense[layer][kv], new[kv][:1]])
                dense_b[layer][kv] = np.concatenate([dense_b[layer][kv], new[kv][1:]])

    def check(handle: TorchKvCacheHandle, want: dict[int, list[np.ndarray]]) -> None:
        for layer in range(2):
            k, _ = handle.kv_tensors(layer)
            assert k.dtype == TORCH[dtype] and k.device.type == "cpu"
            np.testing.assert_array_equal(host(k), want[layer][0])
            np.testing.assert_array_equal(host(handle.value_tensor(layer)), want[layer][1])
            np.testing.assert_array_equal(host(handle.key_tensor(layer)), want[layer][0])

    check(a, dense)
    check(b, dense_b)

    # fork, then copy-on-write: the child's write must not reach the parent
    child = mgr.fork(a, "a/1")
    assert isinstance(child, TorchKvCacheHandle)
    before = mgr.stats().copy_on_write_copies
    mgr.extend(child, 1)  # a's last block is shared and has room: it is copied now
    for layer in range(2):
        k, v = values(rng, (1, 2, 4), dtype), values(rng, (1, 2, 4), dtype)
        child.write(layer, tensor(k, dtype), tensor(v, dtype))
    assert mgr.stats().copy_on_write_copies > before
    check(a, dense)
    child_want = {layer: [np.concatenate([dense[layer][0], host(child.key_tensor(layer))[-1:]]),
                          np.concatenate([dense[layer][1], host(child.value_tensor(layer))[-1:]])]
                  for layer in range(2)}
    check(child, child_want)

    # swap to the second (cpu) pool and back: bit-identical
    raw = {layer: a.key_tensor(layer).clone() for layer in range(2)}
    mgr.swap_out(a)
    assert a.is_swapped()
    with pytest.raises(HandleSwappedError):
        a.key_tensor(0)
    with pytest.raises(HandleSwappedError):
        a.slot_tensor(0)
    mgr.swap_in(a)
    for layer in range(2):
        assert torch.equal(bits(a.key_tensor(layer)), bits(raw[layer]))
    check(a, dense)
    check(child, child_want)
    mgr.check_invariants()
    for h in (a, b, child):
        mgr.deallocate(h)
    mgr.check_invariants()


def test_manager_takes_numpy_and_refuses_wrong_dtype_and_shape() -> None:
    mgr = KvCacheManager(config(DType.float32), backend="torch")
    h = mgr.allocate(AllocationRequest(request_id="r", num_tokens=2))
    k = np.ones((2, 2, 4), np.float32)
    h.write(0, k, 2 * k)  # numpy in, through DLPack
    np.testing.assert_array_equal(h.value_tensor(0).numpy(), 2 * k)
    with pytest.raises(DtypeMismatchError, match="float32"):
        h.write(0, torch.ones(2, 2, 4, dtype=torch.float16), torch.ones(2, 2, 4, dtype=torch.float16))
    with pytest.raises(ShapeMismatchError, match=r"\[2, 3, 4\]"):
        h.write(0, torch.ones(2, 3, 4), torch.ones(2, 3, 4))
    assert h.num_written(0) == 2


def test_writes_that_require_grad_do_not_enter_autograd() -> None:
    mgr = KvCacheManager(config(DType.float32), backend="torch")
    h = mgr.allocate(AllocationRequest(request_id="g", num_tokens=2))
    k = torch.ones(2, 2, 4, requires_grad=True)
    h.write(0, k * 2, k * 3)
    pool = h.pool_tensor(0)
    assert not pool.requires_grad and pool.grad_fn is None
    assert not h.key_tensor(0).requires_grad


def test_manager_built_in_inference_mode_is_writable_outside_it() -> None:
    with torch.inference_mode():
        mgr = KvCacheManager(config(DType.float16), backend="torch")
        h = mgr.allocate(AllocationRequest(request_id="i", num_tokens=2))
        h.write(0, torch.ones(2, 2, 4, dtype=torch.float16), torch.ones(2, 2, 4, dtype=torch.float16))
    mgr.extend(h, 1)
    h.write(0, torch.zeros(1, 2, 4, dtype=torch.float16), torch.zeros(1, 2, 4, dtype=torch.float16))
    assert h.key_tensor(0).shape == (3, 2, 4)


def test_pool_and_slot_tensors_reproduce_the_read() -> None:
    mgr = KvCacheManager(config(DType.float32), backend="torch")
    h = mgr.allocate(AllocationRequest(request_id="p", num_tokens=7))
    k = torch.randn(7, 2, 4)
    h.write(1, k, -k)
    slots = h.slot_tensor(1)
    assert slots.dtype == torch.int64 and slots.shape == (7,)
    flat = h.pool_tensor(1).flatten(1, 2)
    assert torch.equal(flat[0].index_select(0, slots), k)
    assert torch.equal(flat[1].index_select(0, slots), -k)
    assert h.slot_tensor(0).shape == (0,)  # nothing written to layer 0 yet
    assert h.pool_tensor(1).data_ptr() == mgr.layer_pool(1).native.data_ptr()


# --- torch.compile -----------------------------------------------------------------------


def _attend(q: torch.Tensor, pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    flat = pool.flatten(1, 2)
    k, v = flat[0].index_select(0, slots), flat[1].index_select(0, slots)
    scores = torch.einsum("hd,thd->ht", q, k) / q.shape[-1] ** 0.5
    return torch.einsum("ht,thd->hd", scores.softmax(-1), v)


def test_compiled_read_path_has_no_graph_break() -> None:
    """``pool_tensor`` + ``slot_tensor`` feed a ``fullgraph=True`` compile (a graph
    break would raise).  ``aot_eager`` traces exactly what inductor would receive; the
    inductor code generation itself takes ~30 s cold on a 2-core CPU, too slow for CI
    (see docs/backends.md)."""
    torch._dynamo.reset()
    mgr = KvCacheManager(config(DType.float32), backend="torch")
    h = mgr.allocate(AllocationRequest(request_id="c", num_tokens=5))
    h.write(0, torch.randn(5, 2, 4), torch.randn(5, 2, 4))
    compiled = torch.compile(_attend, fullgraph=True, dynamic=True, backend="aot_eager")
    q = torch.randn(2, 4)
    began = time.perf_counter()
    for _ in range(3):  # the sequence grows: dynamic shapes, no recompilation per length
        want = _attend(q, h.pool_tensor(0), h.slot_tensor(0))
        assert torch.allclose(compiled(q, h.pool_tensor(0), h.slot_tensor(0)), want)
        mgr.extend(h, 1)
        h.write(0, torch.randn(1, 2, 4), torch.randn(1, 2, 4))
    assert time.perf_counter() - began < 60


@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace the builtin")
def test_compiled_caller_reading_through_the_handle_works() -> None:
    """Reading with ``key_tensor`` inside a compiled function is correct; it breaks the
    graph (the manager takes a lock and works on host-side tables), which is why the
    pool + slot path above exists."""
    torch._dynamo.reset()
    mgr = KvCacheManager(config(DType.float32), backend="torch")
    h = mgr.allocate(AllocationRequest(request_id="c", num_tokens=3))
    h.write(0, torch.randn(3, 2, 4), torch.randn(3, 2, 4))

    def attend(q: torch.Tensor, handle: TorchKvCacheHandle) -> torch.Tensor:
        k, v = handle.kv_tensors(0)
        return torch.einsum("ht,thd->hd", torch.einsum("hd,thd->ht", q, k).softmax(-1), v)

    q = torch.randn(2, 4)
    assert torch.allclose(torch.compile(attend, backend="eager")(q, h), attend(q, h))


# --- CUDA (skipped with torch's reason where CUDA is unusable) ---------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_pool_swaps_to_pinned_cpu_bit_identical(dtype: DType) -> None:
    rng = np.random.default_rng(5)
    mgr = KvCacheManager(config(dtype, device="cuda:0"), backend="torch")
    assert all(layer.is_pinned() for layer in mgr._swap_layers)
    h = mgr.allocate(AllocationRequest(request_id="s", num_tokens=9))
    want = [values(rng, (9, 2, 4), dtype) for _ in range(2)]
    for layer in range(2):
        h.write(layer, tensor(want[0], dtype, "cuda:0"), tensor(want[1], dtype, "cuda:0"))
    raw = h.key_tensor(1).cpu()
    for _ in range(2):
        mgr.swap_out(h)
        mgr.swap_in(h)
    assert h.key_tensor(1).device == torch.device("cuda", 0)
    assert torch.equal(bits(h.key_tensor(1)), bits(raw))
    np.testing.assert_array_equal(host(h.value_tensor(0)), want[1])
    with pytest.raises(DeviceMismatchError, match=r"cpu.*cuda:0"):
        h.write(0, np.zeros((1, 2, 4), np.dtype("float32")), np.zeros((1, 2, 4), np.float32))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_move_cuda_cpu_cuda_bit_identical(be: TorchBackend, dtype: DType) -> None:
    gpu, cpu = Device("cuda", 0), CPU
    ref = values(np.random.default_rng(6), (2, 6, 4, 2, 3), dtype)
    src = be.from_numpy(ref, dtype, gpu)
    mid = be.allocate_layer(**SHAPE, dtype=dtype, device=cpu, pinned=True)
    back = be.allocate_layer(**SHAPE, dtype=dtype, device=gpu)
    order = np.array([3, 0, 5, 1, 4, 2], np.int64)
    ident = np.arange(6, dtype=np.int64)
    be.transfer_blocks(src, be.index_array(order, gpu), mid, be.index_array(ident, cpu))
    be.synchronize(cpu)
    np.testing.assert_array_equal(be.to_numpy(mid).astype(np.float32), ref[:, order])
    be.transfer_blocks(mid, be.index_array(ident, cpu), back, be.index_array(order, gpu))
    be.synchronize(gpu)
    assert torch.equal(bits(back), bits(src))
    if torch.cuda.device_count() > 1:
        other = be.allocate_layer(**SHAPE, dtype=dtype, device=Device("cuda", 1))
        be.transfer_blocks(src, be.index_array(ident, gpu), other,
                           be.index_array(ident, Device("cuda", 1)))
        be.synchronize(Device("cuda", 1))
        assert torch.equal(bits(other), bits(src))


# --- fast paths: whole-block gather, wide scatter ----------------------------------------


def _slot_patterns(bs: int, nb: int) -> dict[str, np.ndarray]:
    """Slot sets the whole-block gather takes (or must refuse), pool of ``nb`` blocks."""
    runs = lambda blocks, n: (np.asarray(blocks)[:, None] * bs
                              + np.arange(bs)).reshape(-1)[:n].astype(np.int64)
    return {
        "in_order_full": runs([0, 1, 2, 3], 4 * bs),
        "consecutive_partial_last": runs([2, 3, 4], 3 * bs - 1),
        "out_of_order": runs([5, 1, 4, 0], 4 * bs),
        "out_of_order_partial_last": runs([3, 0, 5], 2 * bs + 1),
        "single_block": runs([4], bs),
        "single_block_partial": runs([4], bs - 1),
        "empty": np.zeros(0, np.int64),
        "not_on_boundary": runs([1, 2, 3], 3 * bs) + 1,
        "gap_inside_run": np.concatenate([runs([1], bs), runs([2], bs)[1:], [0]]),
        "rows_shuffled": np.random.default_rng(5).permutation(runs([0, 1, 2], 3 * bs)),
        "block_repeated": runs([2, 2, 3], 3 * bs),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_whole_block_gather_equals_row_gather(be: TorchBackend, dtype: DType,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from kv_torch import _backend as mod
    monkeypatch.setattr(mod, "_WHOLE_BLOCKS_FROM", 0)  # take the fast path from 1 slot
    bs, nb = 4, 6
    rng = np.random.default_rng(7)
    ref = values(rng, (2, nb, bs, 2, 8), dtype)
    layer = be.from_numpy(ref, dtype, CPU)
    flat = ref.reshape(2, nb * bs, 2, 8)
    for name, slots in _slot_patterns(bs, nb).items():
        index = be.index_array(slots, CPU)
        for _ in range(2):  # the second read uses the plan remembered on the index
            for kv in (0, 1):
                got = be.gather(layer, kv, index)
                assert got.dtype == TORCH[dtype] and tuple(got.shape) == (len(slots), 2, 8), name
                assert got.is_contiguous(), name
                np.testing.assert_array_equal(be.to_numpy(got), flat[kv, slots], err_msg=name)
                assert torch.equal(got, layer.flatten(1, 2)[kv].index_select(0, index)), name
                got.fill_(3)  # a new tensor, never a view of the pool
        np.testing.assert_array_equal(be.to_numpy(layer), ref)


def test_whole_block_plan_follows_in_place_changes_and_block_size(
        be: TorchBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    from kv_torch import _backend as mod
    monkeypatch.setattr(mod, "_WHOLE_BLOCKS_FROM", 0)
    dtype = DType.float32
    ref = values(np.random.default_rng(8), (2, 6, 4, 2, 4), dtype)
    layer = be.from_numpy(ref, dtype, CPU)
    flat = ref.reshape(2, 24, 2, 4)
    slots = np.arange(8, 16, dtype=np.int64)  # blocks 2, 3
    index = be.index_array(slots, CPU)
    np.testing.assert_array_equal(be.to_numpy(be.gather(layer, 0, index)), flat[0, slots])
    index[3] = 0  # no longer whole blocks: the remembered plan must not be used
    slots[3] = 0
    np.testing.assert_array_equal(be.to_numpy(be.gather(layer, 0, index)), flat[0, slots])
    # The same index against a pool with another block size is planned afresh.
    other = be.from_numpy(ref.reshape(2, 12, 2, 2, 4), dtype, CPU)
    index2 = be.index_array(np.arange(4, 8, dtype=np.int64), CPU)
    np.testing.assert_array_equal(be.to_numpy(be.gather(layer, 1, index2)), flat[1, 4:8])
    np.testing.assert_array_equal(be.to_numpy(be.gather(other, 1, index2)), flat[1, 4:8])
    # An index made in inference mode (no version counter) works too.
    with torch.inference_mode():
        index3 = be.index_array(np.arange(0, 12, dtype=np.int64), CPU)
    np.testing.assert_array_equal(be.to_numpy(be.gather(layer, 1, index3)), flat[1, :12])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [1, 2, 3, 4, 8, 16])
def test_scatter_every_head_dim_and_layout(be: TorchBackend, dtype: DType, head_dim: int) -> None:
    """Rows go through the widest element that fits (complex128 .. int32) or natively;
    strided, misaligned and grad-requiring K/V fall back or detach, same result."""
    rng = np.random.default_rng(head_dim)
    layer = be.allocate_layer(num_blocks=4, block_size=4, num_kv_heads=3, head_dim=head_dim,
                              dtype=dtype, device=CPU)
    ref = np.zeros((2, 16, 3, head_dim), np.float32)
    slots = np.array([7, 0, 15, 3], np.int64)
    index = be.index_array(slots, CPU)
    k, v = values(rng, (4, 3, head_dim), dtype), values(rng, (4, 3, head_dim), dtype)
    cases = {
        "contiguous": (tensor(k, dtype), tensor(v, dtype)),
        # last dim strided: no dtype view possible
        "strided": (tensor(np.repeat(k, 2, axis=-1), dtype)[..., ::2],
                    tensor(np.repeat(v, 2, axis=-1), dtype)[..., ::2]),
        # data pointer one element off any wide alignment
        "misaligned": (tensor(np.concatenate([k.reshape(-1)[:1], k.reshape(-1)]), dtype)[1:]
                       .view(4, 3, head_dim),
                       tensor(np.concatenate([v.reshape(-1)[:1], v.reshape(-1)]), dtype)[1:]
                       .view(4, 3, head_dim)),
        "requires_grad": (tensor(k, dtype).float().requires_grad_().to(TORCH[dtype]),
                          tensor(v, dtype).float().requires_grad_().to(TORCH[dtype])),
    }
    for name, (kt, vt) in cases.items():
        layer.zero_()
        layer = be.scatter(layer, index, (kt, vt))
        ref[:] = 0
        ref[0, slots], ref[1, slots] = k, v
        np.testing.assert_array_equal(be.to_numpy(layer).reshape(ref.shape), ref, err_msg=name)
        assert not layer.requires_grad


def test_scatter_moves_every_float16_bit_pattern_unchanged(be: TorchBackend) -> None:
    """The wide (complex128) copy does no arithmetic: NaN payloads, -0 and subnormals
    land bit-identical."""
    layer = be.allocate_layer(num_blocks=64, block_size=16, num_kv_heads=8, head_dim=64,
                              dtype=DType.float16, device=CPU)  # 65,536 rows of 512
    patterns = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    key = patterns.view(torch.float16).repeat_interleave(8).view(1024, 8, 64)
    value = patterns.flip(0).view(torch.float16).repeat_interleave(8).view(1024, 8, 64)
    slots = be.index_array(np.random.default_rng(9).permutation(1024).astype(np.int64), CPU)
    layer = be.scatter(layer, slots, (key, value))
    flat = layer.flatten(1, 2)
    assert torch.equal(bits(flat[0].index_select(0, slots)), bits(key))
    assert torch.equal(bits(flat[1].index_select(0, slots)), bits(value))
